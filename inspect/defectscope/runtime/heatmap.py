"""CAM heat-map overlays and thumbnails, numpy + Pillow only (no matplotlib, no OpenCV)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .files import NAME_MAX_BYTES, fit_name, temp_name
from .outputs import OutputError

# A blue -> cyan -> yellow -> red ramp: cold areas read as "model ignored this", hot as "defect here".
_STOPS = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
_COLOURS = np.array(
    [[20, 20, 120], [0, 80, 255], [0, 210, 230], [170, 240, 60], [255, 170, 0], [215, 20, 20]],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to RGB uint8 (shape + (3,))."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HWC uint8 with any band count -> HWC RGB uint8 (grey replicated; N != 3 bands averaged)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 3:
        return image
    grey = image[:, :, :1] if image.shape[2] == 1 else image.mean(axis=2, keepdims=True).astype(np.uint8)
    return np.repeat(grey, 3, axis=2)


def upsample(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """Min-max normalise a (h, w) CAM to [0, 1] and resize it bilinearly to the image size."""
    c = np.asarray(cam, dtype=np.float32)
    lo, hi = float(c.min()), float(c.max())
    norm = (c - lo) / (hi - lo) if hi > lo else np.zeros_like(c)
    up = Image.fromarray(norm, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(up, dtype=np.float32), 0.0, 1.0)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Alpha-blend the coloured CAM over the image; weaker activations blend less."""
    base = to_rgb(image).astype(np.float32)
    heat = upsample(cam, base.shape[1], base.shape[0])
    a = (alpha * (0.3 + 0.7 * heat))[:, :, None]
    out = base * (1.0 - a) + colormap(heat).astype(np.float32) * a
    return np.rint(out).astype(np.uint8)


def thumbnail(image: np.ndarray, max_side: int = 192) -> Image.Image:
    img = Image.fromarray(to_rgb(image))
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return img


def data_uri(img: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, "JPEG", quality=85)
        mime = "image/jpeg"
    else:
        img.save(buf, "PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def heatmap_name(path: str) -> str:
    """A collision-free file name for the overlay of ``path`` (same stem in two folders is common);
    a long stem is cut to fit the name limit with room for the temporary name's ``.`` and ``.tmp``
    (the hash of the whole path keeps cut names apart)."""
    digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return fit_name(Path(path).stem or "image", f"-{digest}.png", NAME_MAX_BYTES - len("..tmp"))


def save_overlay(folder: str | os.PathLike[str], path: str, image: np.ndarray, cam: np.ndarray) -> Path:
    """Write the overlay PNG atomically (a crash never leaves a half-written image); a failed write
    (disk full) leaves no temporary file and raises :class:`OutputError`."""
    out = Path(folder) / heatmap_name(path)
    tmp = out.with_name(temp_name(out.name, "."))
    try:
        Image.fromarray(overlay(image, cam)).save(tmp, "PNG")
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):  # the name itself may be what failed (too long)
            tmp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write a heat map into --heatmaps {folder} ({exc.strerror or exc})"
        ) from None
    return out
