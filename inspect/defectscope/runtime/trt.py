"""TensorRT: one explicit optimisation profile per model, and an engine cache keyed by the model's bytes.

ONNX Runtime names a cached engine by a hash of the model's file name, tensor names and library
versions, not of its weights, so a re-exported model under the same name could be served by a stale
engine (onnxruntime #6455).  Its engine-file lock only works inside one process.  So here:

* every model gets its own folder (the first 16 hex digits of its sha256) and every combination of
  ONNX Runtime version, profile and precision a sub-folder of it;
* a process builds in a private copy of that sub-folder and publishes what it built file by file,
  each through a temporary name and an atomic rename: another process never reads a half-written engine;
* the profile depends on the model and on one maximum batch (:data:`TRT_MAX_BATCH` unless the runner
  is told otherwise), never on a command's ``--batch-size``, so ``inspect`` and ``watch`` share engines.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .image import LoaderConfig, target_size
from .providers import ProviderError

#: Images per TensorRT call: the profile's largest batch.  Larger batches are run in slices of this.
TRT_MAX_BATCH = 16
_MODEL_DIR = re.compile(r"[0-9a-f]{16}")
_SETTINGS_DIR = re.compile(r"ort[0-9][\w.+-]*-b\d+-c\d+-\d+-\d+-fp(16|32)")
_RUN_PREFIX = ".run-"
_LEGACY_FILE = "TensorrtExecutionProvider_"  # engines of the old layout: flat in the cache root
_STALE_RUN_S = 3600.0


def add_trt_options(parser: argparse.ArgumentParser) -> None:
    """The TensorRT options `inspect` and `watch` share (none of them depends on the command)."""
    parser.add_argument(
        "--trt-max-side",
        type=_positive_int,
        default=None,
        metavar="N",
        help="largest side of the model's input (after the model's own upscale_to, if any) in TensorRT's "
        "profile, for models that keep native sizes (max_side null); larger images get an error row",
    )
    parser.add_argument(
        "--trt-max-batch",
        type=_positive_int,
        default=TRT_MAX_BATCH,
        metavar="N",
        help=f"largest batch in TensorRT's profile (default {TRT_MAX_BATCH}); bigger batches run in slices, "
        "so inspect and watch share one engine",
    )
    parser.add_argument(
        "--trt-cache-clean",
        action="store_true",
        help="before starting, remove other models' and outdated engines from the TensorRT cache",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def default_trt_cache() -> Path:
    """Per-user cache folder for TensorRT engines (building one takes minutes; reuse it)."""
    base = os.environ.get("LOCALAPPDATA") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "defectscope" / "trt"


@dataclass(frozen=True)
class TrtProfile:
    """Input shapes an engine accepts: batch 1..max_batch, each side min_side..max_side."""

    max_batch: int
    channels: int
    min_side: int
    max_side: int

    @property
    def tag(self) -> str:
        return f"b{self.max_batch}-c{self.channels}-{self.min_side}-{self.max_side}"

    def __str__(self) -> str:
        return f"batch 1-{self.max_batch}, sides {self.min_side}-{self.max_side} px"

    def provider_options(self) -> dict[str, str]:
        """ORT's three profile options; the largest shape is also the one TensorRT tunes for."""
        low = f"input:1x{self.channels}x{self.min_side}x{self.min_side}"
        high = f"input:{self.max_batch}x{self.channels}x{self.max_side}x{self.max_side}"
        return {"trt_profile_min_shapes": low, "trt_profile_opt_shapes": high, "trt_profile_max_shapes": high}

    def covers(self, shape: tuple[int, ...]) -> bool:
        """Whether an NCHW batch of ``shape`` fits one call (larger batches are sliced first)."""
        _, c, h, w = shape
        lo, hi = self.min_side, self.max_side
        return c == self.channels and lo <= h <= hi and lo <= w <= hi


def largest_side(cfg: LoaderConfig) -> int | None:
    """The longest side the loader can produce; None when it keeps native sizes (unbounded)."""
    if cfg.max_side is None:
        return None
    return max(target_size(cfg.max_side, cfg.max_side, cfg))


def profile_for(cfg: LoaderConfig, max_batch: int, native_max_side: int | None) -> TrtProfile:
    """The one profile covering every size ``cfg`` produces (``native_max_side`` for native-size models)."""
    if max_batch < 1:
        raise ProviderError(f"TensorRT max batch must be >= 1, got {max_batch}")
    top = largest_side(cfg)
    if top is None:
        if native_max_side is None:
            raise ProviderError(
                "the model keeps native image sizes (max_side null), so TensorRT needs the largest side "
                "to expect: pass --trt-max-side N (larger images then get an error row)"
            )
        if native_max_side < cfg.min_size:
            raise ProviderError(
                f"--trt-max-side {native_max_side} is below the model's min_size {cfg.min_size}"
            )
        top = native_max_side
    return TrtProfile(max_batch, cfg.channels, max(1, cfg.min_size), top)


def engine_folder(root: Path, sha256: str, profile: TrtProfile, fp16: bool, ort_version: str) -> Path:
    """Where one model's engines for one set of settings live (the cache key)."""
    return root / sha256[:16] / f"ort{ort_version}-{profile.tag}-{'fp16' if fp16 else 'fp32'}"


def trt_options(profile: TrtProfile, workdir: Path, fp16: bool) -> dict[str, str]:
    """TensorRT provider options; ``trt_fp16_enable`` is engine-wide (the head included)."""
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(workdir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(workdir),
        "trt_fp16_enable": "True" if fp16 else "False",
        **profile.provider_options(),
    }


class EngineCache:
    """One model's engine folder: a private working copy for this process, published atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.workdir: Path | None = None

    def open(self) -> Path:
        """A fresh private folder seeded with the published engines; give it to ONNX Runtime."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{_RUN_PREFIX}{os.getpid()}-", dir=self.folder.parent))
        if self.folder.is_dir():
            for f in self.folder.iterdir():
                if f.is_file() and not f.name.startswith("."):
                    shutil.copy2(
                        f, self.workdir / f.name
                    )  # keeps mtimes: unchanged files are not republished
        return self.workdir

    @property
    def published(self) -> bool:
        return self.folder.is_dir() and any(f.is_file() for f in self.folder.iterdir())

    def publish(self) -> int:
        """Copy what ONNX Runtime built or changed into the shared folder; returns the files published.

        Each file goes through a temporary name and :func:`os.replace`, engines last, so a reader
        sees either the old or the new complete file.  A file another process holds open (Windows)
        is left for the next start.
        """
        assert self.workdir is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        done = 0
        for f in sorted(self.workdir.iterdir(), key=lambda p: (p.suffix == ".engine", p.name)):
            dst = self.folder / f.name
            st = f.stat()
            if dst.is_file() and (dst.stat().st_size, dst.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                continue
            tmp = self.folder / f".{f.name}.{os.getpid()}.tmp"
            try:
                shutil.copy2(f, tmp)
                os.replace(tmp, dst)
                done += 1
            except OSError:
                tmp.unlink(missing_ok=True)
        return done

    def discard(self) -> None:
        """Remove the private copy (the session keeps its engine in memory)."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def clean_engine_cache(root: Path, keep: Path | None = None) -> tuple[int, int]:
    """Remove every engine in ``root`` but ``keep``; returns (entries removed, bytes freed).

    Touches only names this module creates: other models' folders, other settings of this model,
    private copies untouched for an hour (crashed runs), and engine files of the old flat layout.
    """
    if not root.is_dir():
        return 0, 0
    victims: list[Path] = [p for p in root.iterdir() if p.is_file() and p.name.startswith(_LEGACY_FILE)]
    for model in (p for p in root.iterdir() if p.is_dir() and _MODEL_DIR.fullmatch(p.name)):
        if keep is None or model != keep.parent:
            victims.append(model)
            continue
        for entry in model.iterdir():
            stale_run = (
                entry.name.startswith(_RUN_PREFIX) and time.time() - entry.stat().st_mtime > _STALE_RUN_S
            )
            if (_SETTINGS_DIR.fullmatch(entry.name) and entry != keep) or stale_run:
                victims.append(entry)
    freed = sum(_size(v) for v in victims)
    for v in victims:
        if v.is_dir():
            shutil.rmtree(v, ignore_errors=True)
        else:
            v.unlink(missing_ok=True)
    return len(victims), freed


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
