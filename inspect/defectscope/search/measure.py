"""Latency of an exported model, measured through the runtime; FLOPs and size for comparison.

Latency is what the line PC pays, so it is measured, never estimated: the BatchNorm-folded ONNX file
that ``defectscope export`` writes is opened with :class:`defectscope.runtime.Inspector` (the same
session options as ``defectscope inspect``), a batch of the representative size is run ``warmup``
times, then ``repeats`` times, and the median batch time divided by the batch is the latency per image.
FLOPs (:func:`defectscope.models.flops.count_flops`) are recorded beside it to show how well they
predict it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.plain import whole_number
from defectscope.runtime.image import LoaderConfig, load_image_with_size, target_size
from defectscope.runtime.providers import PROVIDER_CHOICES


@dataclass(frozen=True)
class LatencySettings:
    """``search.latency``: how the runtime is timed (batch 16 = ``defectscope inspect``'s default)."""

    batch: int = 16
    warmup: int = 3
    repeats: int = 15
    threads: int | None = None
    provider: str = "auto"
    image_size: tuple[int, int] | None = None  # native (h, w); None = the median validation image

    @classmethod
    def from_config(cls, spec: Any) -> LatencySettings:
        from .errors import SearchConfigError

        plain = dict(spec or {})
        unknown = sorted(set(plain) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise SearchConfigError(
                f"search.latency: unknown key(s) {unknown}; valid: {', '.join(cls.__dataclass_fields__)}"
            )
        for key in ("batch", "warmup", "repeats", "threads"):
            least = 0 if key == "warmup" else 1
            whole_number(plain.get(key, getattr(cls, key)), f"search.latency.{key}", least, key == "threads")
        if plain.get("provider", cls.provider) not in PROVIDER_CHOICES:
            raise SearchConfigError(
                f"search.latency.provider must be one of {', '.join(PROVIDER_CHOICES)}, got {plain['provider']!r}"
            )
        size = plain.get("image_size")
        if size is not None:
            if (
                not isinstance(size, list | tuple)
                or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
            ):
                raise SearchConfigError(
                    f"search.latency.image_size must be null or [height, width], got {size!r}"
                )
            plain["image_size"] = (int(size[0]), int(size[1]))
        return cls(**plain)


@dataclass(frozen=True)
class Latency:
    ms_per_image: float
    batch: int
    height: int
    width: int
    batch_ms: list[float]
    provider: str
    threads: int

    @property
    def images_per_s(self) -> float:
        return 1000.0 / self.ms_per_image

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


def native_size(paths: Sequence[str], channels: int, limit: int = 64) -> tuple[int, int]:
    """(h, w) of the validation image with the median pixel count: a real, representative image."""
    native = LoaderConfig(channels=channels, max_side=None, min_size=1, size_multiple=1)
    sizes = []
    for path in list(paths)[:limit]:
        try:
            w, h = load_image_with_size(path, native)[1]
        except Exception:  # an unreadable image is the scan's business, not the timer's
            continue
        sizes.append((h * w, h, w))
    if not sizes:
        raise ValueError("no readable validation image to take a representative size from")
    _, h, w = sorted(sizes)[len(sizes) // 2]
    return h, w


def input_size(native: tuple[int, int], loader: LoaderConfig) -> tuple[int, int]:
    """The (h, w) the model sees for a native (h, w) image under a loader policy."""
    w, h = target_size(native[1], native[0], loader)
    return h, w


def measure_latency(
    onnx_path: str | Path, height: int, width: int, settings: LatencySettings, seed: int = 0
) -> Latency:
    """Median per-image latency of ``onnx_path`` through :class:`Inspector` (warm-up, then repeats)."""
    from defectscope.runtime import Inspector

    inspector = Inspector(
        onnx_path,
        provider=settings.provider,
        threads=settings.threads,
        trt_max_batch=settings.batch,
        log=lambda _msg: None,
    )
    channels = inspector.metadata.channels
    batch = np.random.default_rng(seed).standard_normal((settings.batch, channels, height, width))
    batch = batch.astype(np.float32)
    for _ in range(settings.warmup):
        inspector.predict(batch, cam=False)
    times = []
    for _ in range(settings.repeats):
        t0 = time.perf_counter()
        inspector.predict(batch, cam=False)
        times.append((time.perf_counter() - t0) * 1000.0)
    return Latency(
        ms_per_image=statistics.median(times) / settings.batch,
        batch=settings.batch,
        height=height,
        width=width,
        batch_ms=[round(t, 3) for t in times],
        provider=inspector.provider,
        threads=inspector.threads,
    )


def export_untrained(
    model: Any, info: dict[str, Any], path: Path, log: Callable[[str], None] = lambda _m: None
) -> Path:
    """Export a freshly built model exactly as ``defectscope export`` would (fold, export, parity gate).

    Latency depends on the graph, not on the weights, so this measures an architecture before it is
    trained (the latency budget and early stopping need it); random inputs feed the parity gate.
    An untrained graph has no threshold worth earning, so a placeholder is set by hand: this file
    is only ever timed, never shipped.
    """
    from defectscope.export.onnx_export import export_model

    path.parent.mkdir(parents=True, exist_ok=True)
    export_model(model.eval(), info, path, parity_images=0, threshold=0.5, log=log)
    return path


def model_cost(model: Any, channels: int, height: int, width: int) -> dict[str, int]:
    """FLOPs (2 x MACs) and parameters for one image of the representative size."""
    from defectscope.models.flops import count_flops

    count = count_flops(model, (channels, height, width))
    return {"flops": int(count.flops), "params": int(count.params)}
