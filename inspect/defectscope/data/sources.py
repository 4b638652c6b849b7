"""Dataset sources: where the (path, label, split) list comes from, chosen by ``source.kind``.

Every source returns the same :class:`SourceData`, so the scan, splits, sampler and DataModule
never care whether the images came from a folder tree, a CSV manifest, the ELPV package or the
synthetic generator.  Sources only list files; decoding and validation belong to the scan.
Torch-free, so `defectscope scan` starts fast.
"""

from __future__ import annotations

import csv
import inspect
import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..hints import close_names
from ..plain import as_class_name, to_plain
from ..runtime.files import (
    IMAGE_EXTENSIONS,
    TEXT_HEAD_BYTES,
    absolute_path,
    listed_path,
    os_error_reason,
    text_problem,
    unusable_name,
    walk_files,
)
from ..runtime.metadata import class_list_problem
from ..runtime.outputs import OutputError, check_output_folder, is_special
from ..synth import DEFAULT_CLASSES, MANIFEST
from .elpv import elpv_source
from .errors import SourceError
from .records import SPLITS, Sample, SourceData
from .synth_cache import check_synthetic_request, ensure_synthetic


def _check_classes(good_class: str | None, class_names: Sequence[str], where: str) -> None:
    """Classes a model can be trained for and carry: unique names the model file accepts (the run would
    otherwise fail at its own checkpoint or at export), the good class among them."""
    problem = class_list_problem(list(class_names), least=1)
    if problem:
        raise SourceError(f"{where}: {problem}")
    folded: dict[str, str] = {}
    for name in class_names:
        if (other := folded.setdefault(name.casefold(), name)) != name:
            raise SourceError(
                f"{where}: classes {other!r} and {name!r} differ only in case, so they would train as two "
                "classes; write the one class alike everywhere"
            )
    if good_class is not None and good_class not in class_names:
        raise SourceError(
            f"{where}: good_class {good_class!r} is not one of the classes {list(class_names)}; "
            "set data.source.good_class"
        )


# --------------------------------------------------------------------------- folder


def _list_class_dir(d: Path, extensions: Sequence[str], ignored: list[str]) -> list[Path]:
    """A class folder's images (by ``data.source.extensions``), in path order; what else it holds goes to
    ``ignored``. Which files a folder holds is :func:`walk_files`' rule, as for inspect and export."""
    files: list[Path] = []

    def refuse(folder: str, exc: OSError) -> None:
        raise SourceError(
            f"{folder}: cannot be read ({os_error_reason(exc)}); its images would be left out: make it readable "
            "or move it out of the data folder"
        )

    for p in sorted(Path(f) for f in walk_files(d, unreadable=refuse)):
        if p.suffix.lower() in extensions:
            files.append(p)
        else:
            ignored.append(str(p))
    return files


#: where a source's classes come from, for its messages, unless a caller names another (a model's classes)
CONFIG_CLASSES = "data.source.classes"


def folder_source(
    root: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
    good_class: str | None = "good",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    classes_key: str = CONFIG_CLASSES,
) -> SourceData:
    """``root/<class>/**/*.png`` or ``root/{train,val,test}/<class>/**/*.png``.

    Class order is ``classes`` when given, else the sorted folder names.  Files in class folders
    with other extensions, and files beside the class folders, are ignored (and reported); hidden ones are not part of the folder
    (:func:`walk_files`); an image extension on a non-image is left for the scan to reject.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise SourceError(f"data.source.root: folder {base} does not exist or is not a folder")
    exts = tuple(e.lower() for e in extensions)
    subdirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in subdirs if p.name in SPLITS]
    if split_dirs:
        others = [p.name for p in subdirs if p.name not in SPLITS]
        if others:
            raise SourceError(
                f"{base}: mixes split folders ({', '.join(p.name for p in split_dirs)}) with other "
                f"folders ({', '.join(others)}); use either <root>/<class>/ or <root>/<split>/<class>/"
            )
        layout: list[tuple[str | None, Path]] = [(p.name, p) for p in split_dirs]
    else:
        layout = [(None, base)]

    found: dict[str, list[tuple[str | None, Path]]] = {}
    for split, d in layout:
        for cdir in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found.setdefault(cdir.name, []).append((split, cdir))
    if not found:
        raise SourceError(f"{base}: no class folders found; expected <root>/<class>/ with images inside")

    names = list(classes) if classes else sorted(found)
    unlisted = sorted(set(found) - set(names))
    if unlisted:
        advice = (  # classes a model was trained on cannot be added to: only the folders can change
            "add them or move them out of the dataset folder"
            if classes_key == CONFIG_CLASSES
            else "the model has no such class: rename them to one of those, or move them out of the dataset folder"
        )
        raise SourceError(f"{base}: class folders {unlisted} are not in {classes_key} {names}; {advice}")
    _check_classes(good_class, names, str(base))
    ignored = [
        str(f) for _, d in layout for f in sorted(d.iterdir()) if f.is_file() and not f.name.startswith(".")
    ]
    samples: list[Sample] = []  # (files beside the class folders are no class's: told as ignored)
    for label, name in enumerate(names):
        for split, cdir in found.get(name, []):
            samples.extend(Sample(str(p), label, split) for p in _list_class_dir(cdir, exts, ignored))
    if not samples:
        raise SourceError(f"{base}: the class folders contain no image files ({', '.join(exts)})")
    return SourceData(f"folder {base}", samples, names, good_class, ignored=ignored)


# --------------------------------------------------------------------------- csv


def some(items: Sequence[str], shown: int = 5) -> str:
    """The first few of ``items`` on one line, saying how many more: an error stays one line."""
    more = f" (and {len(items) - shown} more)" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def _not_utf8(text: str) -> bool:
    """Whether ``text`` holds bytes that were not UTF-8 (``surrogateescape`` turned them into U+DC80-DCFF)."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def _check_rows(
    rows: Sequence[tuple[int, str, str, str]], names: Sequence[str], csv_path: Path, classes_key: str
) -> None:
    """Every invalid (line, path, label, split) row of a manifest in one line: the first few and the count."""
    problems: list[str] = []
    unknown = False
    first_row: dict[str, int] = {}
    for line, p, label, split in rows:
        if p and first_row.setdefault(p, line) != line:  # one image twice could land in two splits
            problems.append(f"row {line}: {p} already on row {first_row[p]}")
        if not p or not label:
            problems.append(f"row {line}: empty path or label")
        if _not_utf8(label + split):  # names may be in the OS's bytes; class names travel to the model
            problems.append(f"row {line}: label or split is not UTF-8 text; save the CSV as UTF-8")
        if split and split not in SPLITS:
            problems.append(f"row {line}: split {split!r} is not one of {', '.join(SPLITS)} (or empty)")
        if label and label not in names:
            near = close_names(label, names, n=1)
            problems.append(
                f"row {line}: label {label!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
            )
            unknown = True
    if problems:
        known = f"; labels must be in {classes_key} {list(names)}" if unknown else ""
        raise SourceError(f"{csv_path}: {len(problems)} invalid row(s): {some(problems)}{known}")


def _check_one_line(record: Mapping[Any, Any], end_line: int, csv_path: Path) -> None:
    """A path, label or split holding a line break came from a quote left open: say where, not what it did
    to the columns.  Other columns may hold closed multi-line notes."""
    # a quote left open at the end of the file takes the last newline with it
    columns = ("path", "label", "split")
    values = [v.rstrip("\r\n") for k, v in record.items() if k in columns and isinstance(v, str)]
    breaks = sum(v.count("\n") for v in values)
    if breaks:
        spanning = next(v for v in values if "\n" in v)
        raise SourceError(
            f"{csv_path}: lines {end_line - breaks}-{end_line} are one row: a path, label or split holds a line "
            f"break ({spanning[:60]!r}), so a quote there is probably not closed; check its quotes"
        )


def csv_source(
    path: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
    good_class: str | None = "good",
    missing: str = "error",
    classes_key: str = CONFIG_CLASSES,
) -> SourceData:
    """A manifest with header ``path,label[,split]``; relative paths resolve against the CSV's folder.

    ``missing="error"`` reports every row whose file does not exist in one error; ``"keep"``
    keeps those rows so the scan lists them with the other bad files (``on_bad_file: skip``).
    ``classes_key`` names where ``classes`` came from in messages (a model's classes, for evaluate).
    """
    csv_path = Path(path).expanduser()
    if missing not in ("error", "keep"):
        raise SourceError(f"data.source.missing must be 'error' or 'keep', got {missing!r}")
    if is_special(csv_path):  # reading a pipe with no writer would wait for ever
        raise SourceError(
            f"data.source.path {csv_path}: is not a regular file (a pipe or device); expected a CSV file"
        )
    try:
        raw = csv_path.read_bytes()
    except OSError as exc:
        raise SourceError(f"data.source.path: cannot open CSV {csv_path}: {os_error_reason(exc)}") from None
    problem = text_problem(raw[:TEXT_HEAD_BYTES])
    if problem:
        raise SourceError(f"data.source.path: CSV {csv_path} {problem}")
    # names that are not UTF-8 stay as the OS gives them, as in list files
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if "path" not in header or "label" not in header:
        raise SourceError(
            f"{csv_path}: the first line must be a header with columns path,label[,split]; got {header}"
        )
    reader.fieldnames = header
    rows = []
    try:
        for rec in reader:
            p = (rec.get("path") or "").strip()
            if not p and not (rec.get("label") or "").strip():
                continue  # blank line
            _check_one_line(rec, reader.line_num, csv_path)
            rows.append(
                (reader.line_num, p, (rec.get("label") or "").strip(), (rec.get("split") or "").strip())
            )
    except csv.Error as exc:  # e.g. an unmatched quote that swallows the rest of the file
        raise SourceError(
            f"{csv_path}: line {reader.line_num}: not valid CSV ({exc}); check its quotes"
        ) from None
    if not rows:
        raise SourceError(f"{csv_path}: no data rows")

    names = list(classes) if classes else sorted({r[2] for r in rows if r[2]})
    _check_rows(rows, names, csv_path, classes_key)
    _check_classes(good_class, names, str(csv_path))

    folder = absolute_path(str(csv_path.parent))
    samples: list[Sample] = []
    absent: list[str] = []
    origin: dict[str, str] = {}
    for line, p, label, split in rows:
        full = Path(listed_path(p, folder))  # the rule of inspect's and export's list files
        unusable = unusable_name(full)  # a name too long for the file system cannot exist
        if unusable or not full.exists():
            absent.append(f"row {line}: {p} ({unusable or full})")
        samples.append(Sample(str(full), names.index(label), split or None))
        origin[str(full)] = f"{csv_path} row {line}"
    if absent and missing == "error":
        raise SourceError(
            f"{csv_path}: {len(absent)} of {len(rows)} rows name files that do not exist: {some(absent)}"
        )
    return SourceData(f"csv {csv_path}", samples, names, good_class, origin=origin)


# --------------------------------------------------------------------------- synthetic


def synthetic_source(
    root: str | os.PathLike[str],
    n: int = 240,
    seed: int = 0,
    channels: int = 1,
    min_size: int = 96,
    max_size: int = 512,
    classes: Sequence[str] = DEFAULT_CLASSES,
    good_class: str = "good",
    region: str = "anywhere",
) -> SourceData:
    """The built-in generator's output, (re)generated when missing or incomplete, read as a folder.

    ``region``: where defects lie (``defectscope.synth.REGIONS``), e.g. for a position-holdout test.
    """
    base = ensure_synthetic(root, n, seed, channels, min_size, max_size, classes, region)
    data = folder_source(base, classes=list(classes), good_class=good_class, extensions=(".png",))
    data.description = f"synthetic {base} (n={n}, seed={seed})"
    data.ignored = [p for p in data.ignored if Path(p) != base / MANIFEST]
    return data


# --------------------------------------------------------------------------- dispatch

SOURCES: dict[str, Callable[..., SourceData]] = {
    "folder": folder_source,
    "csv": csv_source,
    "elpv": elpv_source,
    "synthetic": synthetic_source,
}


def input_paths(spec: Any) -> dict[str, str]:
    """The files and folders a source spec reads, by config key: no output may be one of them."""
    if not isinstance(spec, Mapping):
        return {}
    return {f"data.source.{k}": v for k in ("root", "path") if isinstance(v := spec.get(k), str) and v}


#: what a source's path setting names, for its one-line refusal
_PATH_MEANING = {
    ("csv", "path"): "the CSV manifest's path (columns path,label[,split])",
    ("folder", "root"): "the image folder's path (one folder per class)",
    ("synthetic", "root"): "the folder to generate into",
}


def source_arguments(
    spec: Mapping[str, Any], *, missing: str | None = None
) -> tuple[str, Callable[..., SourceData], dict[str, Any]]:
    """The kind, its builder and its arguments; a wrong kind or an unknown key is refused here, without
    touching a file, so a typo fails before a run starts."""
    params = to_plain(spec, strict=True)
    if not isinstance(params, dict):
        raise SourceError(f"data.source must be a mapping with kind ({', '.join(SOURCES)}), got {spec!r}")
    kind = params.pop("kind", None)
    for key in ("good_class", "classes"):  # Hydra reads a class folder named 0 as the number 0
        if key not in params:
            continue
        value = params[key]
        params[key] = [as_class_name(v) for v in value] if isinstance(value, list) else as_class_name(value)
    classes, good = params.get("classes"), params.get("good_class")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise SourceError(f"data.source.classes must be null or a list of class names, got {classes!r}")
    if good is not None and not isinstance(good, str):
        raise SourceError(f"data.source.good_class must be a class name, got {good!r}")
    if not isinstance(kind, str) or kind not in SOURCES:
        raise SourceError(f"data.source.kind must be one of {', '.join(SOURCES)}, got {kind!r}")
    fn = SOURCES[kind]
    if kind == "csv" and missing is not None:
        params.setdefault("missing", missing)
    if kind == "folder" and "path" in params and "root" not in params:
        params["root"] = params.pop("path")
    valid = list(inspect.signature(fn).parameters)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        shown = [k for k in valid if k != "classes_key"]  # set by evaluate for its messages, not a setting
        raise SourceError(f"data.source: unknown key(s) {unknown} for kind={kind}; valid keys: {shown}")
    for key in ("root", "path"):
        value = params.get(key)
        needed = key in valid and inspect.signature(fn).parameters[key].default is inspect.Parameter.empty
        if (value is not None or needed) and not isinstance(value, str):  # Hydra: 5 is a number, [a,b] a list
            what = _PATH_MEANING.get((kind, key), f"a path (kind={kind})")
            raise SourceError(f"data.source.{key} must be {what}, got {value!r}")
        if isinstance(value, str) and value and (unusable := unusable_name(Path(value).expanduser())):
            raise SourceError(f"data.source.{key} {value}: cannot be used ({unusable})")
    if kind == "synthetic":
        # the generator's folder and numbers, before a run starts (the generation runs in prepare_data)
        root = params.get("root")
        if not (isinstance(root, str) and root):
            raise SourceError(f"data.source.root must be the folder to generate into, got {root!r}")
        if not Path(root).expanduser().exists():  # generated into on first use: it must be creatable
            try:
                check_output_folder(Path(root).expanduser(), "data.source.root")
            except OutputError as exc:
                raise SourceError(str(exc)) from None
        given = inspect.signature(fn).bind_partial(**params)
        given.apply_defaults()
        request = {k: v for k, v in given.arguments.items() if k not in ("root", "good_class")}
        check_synthetic_request(**request)
    return kind, fn, params


def build_source(spec: Mapping[str, Any], *, missing: str | None = None) -> SourceData:
    """Build the source named by ``spec["kind"]`` with the remaining keys as its arguments."""
    kind, fn, params = source_arguments(spec, missing=missing)
    try:
        return fn(**params)
    except TypeError as exc:
        raise SourceError(f"data.source (kind={kind}): {exc}") from None


def prepare_source(spec: Mapping[str, Any]) -> None:
    """Download/generate step (Lightning ``prepare_data``): only the synthetic source has one."""
    kind, _, params = source_arguments(spec)
    if kind == "synthetic":
        params.pop("good_class", None)
        ensure_synthetic(**params)
