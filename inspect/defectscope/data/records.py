"""What every data source yields: the samples (path, label, split, stratum) and the class list."""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    """One image of a dataset. ``stratum`` (default: the class) is what splits are stratified on."""

    path: str
    label: int
    split: str | None = None
    stratum: str | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class SourceData:
    """What a source yields: samples, the class list (label order) and the 'good' class."""

    description: str
    samples: list[Sample]
    class_names: list[str]
    #: ``None`` only for a bare listing (`defectscope scan` without --good-class); training requires it
    good_class: str | None
    #: split settings this source recommends when the config leaves them unset (ELPV: 25 % test, seed 42)
    split_defaults: dict[str, float | int] = field(default_factory=dict)
    #: files that were passed over (wrong extension, hidden), for the report
    ignored: list[str] = field(default_factory=list)
    #: path -> where it was listed (CSV: "<csv> row N"), so error lists can point at the manifest line
    origin: dict[str, str] = field(default_factory=dict)
