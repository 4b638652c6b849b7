"""File names the product derives from an input's (heat maps, stem_1, temporary copies) stay within the
255-byte limit, whatever the input's name: multi-byte characters and bytes that are not UTF-8 included."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from defectscope.runtime.files import NAME_MAX_BYTES, PARTIAL_PREFIX, fit_name
from defectscope.runtime.hotfolder import move_no_overwrite


@pytest.mark.parametrize(
    "stem",
    ["short", "\u00e9" * 125, "\u65e5" * 84, "\U0001f600" * 63, "bad\udcff" * 60, "x" * 300],
)
def test_fit_name_cuts_at_a_character_within_the_limit(stem: str) -> None:
    name = fit_name(stem, "_12.png")
    data = name.encode("utf-8", "surrogateescape")
    assert len(data) <= NAME_MAX_BYTES and name.endswith("_12.png")
    kept = name[: -len("_12.png")]
    assert stem.startswith(kept) and kept  # a prefix of whole characters, never empty
    if len(stem.encode("utf-8", "surrogateescape")) + 7 <= NAME_MAX_BYTES:
        assert kept == stem  # short names are left alone
    else:
        assert len(data) > NAME_MAX_BYTES - 4  # cut no more than one character's bytes too far


@pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tempfile.gettempdir()).st_dev,
    reason="needs a second file system (/dev/shm) for a cross-device move",
)
def test_cross_device_move_of_a_long_name(tmp_path: Path) -> None:
    """Across file systems the move copies to a dot-temporary first; PARTIAL_PREFIX + a 244-byte name
    was past the limit, so the file stayed in the hot folder for good."""
    name = "a" * 240 + ".png"
    src = tmp_path / name
    src.write_bytes(b"\x89PNG data")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        dst = Path(other) / name
        move_no_overwrite(src, dst)
        assert dst.read_bytes() == b"\x89PNG data" and not src.exists()
        assert not [n for n in os.listdir(other) if n.startswith(PARTIAL_PREFIX)]
