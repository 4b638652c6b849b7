"""The loader's size policy: what an exported model promises about the images it is given.

:class:`LoaderConfig` travels in every exported model; the size functions here are the one place
that turns an image's decoded size into the model's input size (``max_side`` downscale, then
``upscale_to``, then rounding to ``size_multiple``) and decides when an image is too small.
``downscale`` says how the pixels get there; :mod:`.image` applies it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: values of ``LoaderConfig.downscale`` (:mod:`.image`'s docstring says what each does)
DOWNSCALE_MODES = ("exact", "fast")


@dataclass(frozen=True)
class LoaderConfig:
    """Preprocessing policy; it is embedded in every exported model.

    ``max_side``: downscale so the long side is at most this (aspect kept); ``None`` keeps the
    native size.  ``size_multiple``: round each side to the nearest multiple (>= 1) so images
    fall into few size buckets; 1 disables it.  ``min_size``: smallest allowed side after
    resizing.  ``max_pixels``: decompression-bomb guard on the decoded size.  ``downscale``: one
    of :data:`DOWNSCALE_MODES` (module docstring); the default is what models exported before the
    field existed were trained with.  ``upscale_to``: enlarge so the short side is at least this
    before rounding to ``size_multiple`` (aspect kept; the long side stays within ``max_side`` and the
    area within ``max_pixels``), so a small defect covers more cells of the network's stride-32 grid;
    ``None`` never enlarges.  ``min_size`` still applies to the real pixels, before enlarging.
    """

    channels: int = 1
    max_side: int | None = None
    min_size: int = 32
    size_multiple: int = 1
    max_pixels: int = 40_000_000
    downscale: str = "exact"
    upscale_to: int | None = None

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"loader.channels must be >= 1, got {self.channels}")
        if self.max_side is not None and self.max_side < self.min_size:
            raise ValueError(f"loader.max_side ({self.max_side}) must be >= min_size ({self.min_size})")
        if self.size_multiple < 1:
            raise ValueError(f"loader.size_multiple must be >= 1, got {self.size_multiple}")
        if self.size_multiple**2 > self.max_pixels:  # rounding would make every image that large
            raise ValueError(
                f"loader.size_multiple ({self.size_multiple}) squared must be <= max_pixels "
                f"({self.max_pixels}): rounding would enlarge every image to at least "
                f"{self.size_multiple}x{self.size_multiple} pixels"
            )
        if self.max_side is not None and self.size_multiple > 1:
            # target_size caps rounded sides at the largest multiple <= max_side: there must be one,
            # and it must not be below min_size, or sizes leave the range the model was made for
            top = self.max_side // self.size_multiple * self.size_multiple
            if top == 0:
                raise ValueError(
                    f"loader.size_multiple ({self.size_multiple}) must be <= max_side ({self.max_side}): "
                    f"rounding would make sides of {self.size_multiple}, above max_side"
                )
            if top < self.min_size:
                raise ValueError(
                    f"loader.size_multiple ({self.size_multiple}) leaves no side between min_size "
                    f"({self.min_size}) and max_side ({self.max_side}): the largest multiple <= max_side "
                    f"is {top}; lower size_multiple or raise max_side"
                )
        if self.upscale_to is not None and self.upscale_to < 1:
            raise ValueError(f"loader.upscale_to must be >= 1 or None, got {self.upscale_to}")
        if self.downscale not in DOWNSCALE_MODES:
            raise ValueError(
                f"loader.downscale must be one of {', '.join(DOWNSCALE_MODES)}, got {self.downscale!r}"
            )

    def to_dict(self) -> dict[str, int | str | None]:
        return asdict(self)


def scaled_size(width: int, height: int, cfg: LoaderConfig) -> tuple[int, int]:
    """Size (w, h) after the ``max_side`` downscale only: the real pixels, before any rounding."""
    w, h = width, height
    if cfg.max_side is not None and max(w, h) > cfg.max_side:
        scale = cfg.max_side / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    return w, h


def enlarged_size(width: int, height: int, cfg: LoaderConfig) -> tuple[int, int]:
    """Size (w, h) after ``max_side`` and then ``upscale_to``, before rounding.

    The enlargement stops where the long side reaches ``max_side`` or the area ``max_pixels``: a
    long thin image must not become a gigapixel input (a model file could ask for any ``upscale_to``).
    """
    w, h = scaled_size(width, height, cfg)
    if cfg.upscale_to is None or min(w, h) >= cfg.upscale_to:
        return w, h
    scale = min(cfg.upscale_to / min(w, h), math.sqrt(cfg.max_pixels / (w * h)))
    if cfg.max_side is not None:
        scale = min(scale, cfg.max_side / max(w, h))
    if scale <= 1.0:
        return w, h
    nw, nh = round(w * scale), round(h * scale)  # scale > 1: never below the real size
    if nw * nh > cfg.max_pixels:  # rounding up crossed the area cap
        return math.floor(w * scale), math.floor(h * scale)
    return nw, nh


def target_size(width: int, height: int, cfg: LoaderConfig) -> tuple[int, int]:
    """Size (w, h) an image of ``width`` x ``height`` has after the resize policy."""
    w, h = enlarged_size(width, height, cfg)
    m = cfg.size_multiple
    if m > 1:
        w, h = max(m, round(w / m) * m), max(m, round(h / m) * m)
        if cfg.max_side is not None:  # rounding up must not break the long-side promise
            cap = (cfg.max_side // m) * m
            w, h = min(w, max(m, cap)), min(h, max(m, cap))
    return w, h


def too_small(width: int, height: int, cfg: LoaderConfig) -> str | None:
    """Why an image is too small for ``cfg.min_size``, or None.

    The rule is on real pixels (after the ``max_side`` downscale, before rounding to the size
    multiple): a 4x4 image rounded up to 32x32 would be all invented pixels.  The rounded size
    must fit too, since the model's geometry check relies on ``min_size``.
    """
    (w, h), m = scaled_size(width, height, cfg), cfg.size_multiple
    if min(w, h) < cfg.min_size:
        becomes = "" if (w, h) == (width, height) else f" becomes {w}x{h} after resizing"
        note = f" (checked before rounding to the size multiple {m})" if m > 1 else ""
        return f"{width}x{height}{becomes}; the minimum side is {cfg.min_size} px{note}"
    w, h = target_size(width, height, cfg)
    if min(w, h) < cfg.min_size:
        return (
            f"{width}x{height} becomes {w}x{h} after rounding to the size multiple {m}; "
            f"the minimum side is {cfg.min_size} px"
        )
    return None
