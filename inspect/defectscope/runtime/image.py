"""The one image loader shared by training, evaluation, export parity and the line runtime.

It imports numpy and Pillow only, so preprocessing cannot drift between the trainer and the
line PC.  Every failure raises :class:`ImageLoadError`, whose message names the file and the
cause; ``kind`` is a short machine-readable code for result rows and reject lists.

Channel rule (documented in README): alpha is discarded (not composited); palette and CMYK
images are converted to RGB first.  For 1 channel, colour is reduced to ITU-R 601-2 luma.
For 3 channels, grey is replicated.  For any other N, an image that already has N bands is
kept as is, otherwise its luma is replicated N times.

Bit-depth rule: 16-bit data ("I;16*") is scaled by 255/65535.  32-bit integer data ("I")
is scaled the same way when it lies in [0, 65535], otherwise min-max scaled; float data
("F") in [0, 1] is scaled by 255, otherwise min-max scaled.  Nothing wraps or clips.

Downscale rule (``LoaderConfig.downscale``): ``exact`` resizes the fully decoded image with one
antialiased bilinear pass.  ``fast`` lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale in the DCT
domain (Pillow ``draft``; a 1-channel model gets the JPEG's own luma), then box-reduces by whole
factors to within ``REDUCING_GAP`` times the target (Pillow ``reduce``) before the same bilinear
pass.  It only differs where the model shrinks an image at least 2x (or reads an RGB JPEG as grey)
and makes large JPEG frames 1.7-2.6x cheaper; pixels differ by a few grey levels, which is why the policy
is part of the exported model and training reads it from the same config.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import IMAGE_FORMATS, IMAGE_FORMATS_TEXT
from .image_file import ImageLoadError as ImageLoadError
from .image_file import max_file_bytes, read_image_file
from .loader_config import LoaderConfig as LoaderConfig
from .loader_config import target_size as target_size
from .loader_config import too_small

#: Error kinds, in the order a user would meet them.
ERROR_KINDS = (
    "vanished",
    "is_directory",
    "not_a_file",
    "unreadable",
    "zero_bytes",
    "not_an_image",
    "unsupported_mode",
    "too_large",
    "truncated",
    "too_small",
)

#: a PNG's last chunk (length 0, type IEND, its CRC)
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"

#: ``fast``: box-reduce by whole factors down to at most this many times the target size (Pillow's default)
REDUCING_GAP = 2.0
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height
_SWAPS_SIDES = (5, 6, 7, 8)

_SUPPORTED_MODES = {
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
    "I;16", "I;16L", "I;16B", "I;16N", "I", "F",
}  # fmt: skip


def _open(path: Path, data: bytes, cfg: LoaderConfig) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``data`` (EXIF orientation applied) and return it with its full (w, h).

    Under ``downscale="fast"`` a JPEG may come back smaller than its full size (see :func:`_draft`).
    """
    img: Image.Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            raise ImageLoadError(
                path, "not_an_image", f"not a recognised image ({IMAGE_FORMATS_TEXT} expected)"
            ) from None
        except Image.DecompressionBombError:
            raise ImageLoadError(path, "too_large", "image exceeds the decompression-bomb limit") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError(path, "not_an_image", f"cannot be parsed as an image: {exc}") from None
    if img.format == "PNG" and data.rfind(_PNG_END) < 0:  # searched from the end, where it sits
        # a writer that sizes the file first and fills it later (Windows copies, SMB) leaves zeros at
        # the end, which Pillow decodes as black rows; the end chunk is the last thing written
        raise ImageLoadError(
            path, "truncated", "PNG without its IEND end chunk (cut short or still being written)"
        )
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise ImageLoadError(
            path, "too_large", f"{w}x{h} = {w * h} pixels exceeds the limit of {cfg.max_pixels} pixels"
        )
    if img.mode not in _SUPPORTED_MODES:
        raise ImageLoadError(
            path,
            "unsupported_mode",
            f"unsupported pixel mode {img.mode!r} (supported: {', '.join(sorted(_SUPPORTED_MODES))})",
        )
    full = _draft(img, cfg) if cfg.downscale == "fast" and img.format == "JPEG" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is nothing to do
        except Image.DecompressionBombError:
            raise ImageLoadError(path, "too_large", "image exceeds the decompression-bomb limit") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError(path, "truncated", f"truncated or corrupt image data: {exc}") from None
    return img, full or img.size


def _draft(img: Image.Image, cfg: LoaderConfig) -> tuple[int, int]:
    """Configure a not yet decoded JPEG for the ``fast`` policy; returns its full upright (w, h).

    libjpeg then decodes at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least
    the model's target size, and delivers the JPEG's luma directly when the model wants grey.
    """
    w, h = img.size
    swap = img.getexif().get(_ORIENTATION, 1) in _SWAPS_SIDES
    full = (h, w) if swap else (w, h)
    tw, th = target_size(*full, cfg)
    img.draft("L" if cfg.channels == 1 else None, (th, tw) if swap else (tw, th))
    return full


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale high bit-depth data to uint8 without wrapping or clipping."""
    a = arr.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        a = a * (255.0 / 65535.0)
    elif mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:
        a = a * 255.0
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.rint(a).astype(np.uint8)


def to_channels(img: Image.Image, channels: int) -> np.ndarray:
    """Convert a decoded Pillow image of any supported mode to HWC uint8 with ``channels`` bands."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        grey = _to_uint8(np.asarray(img), mode)
        return np.repeat(grey[:, :, None], channels, axis=2)
    img = _eight_bit(img)
    bands = len(img.getbands())
    if channels == 1:
        return np.asarray(img.convert("L"))[:, :, None]
    if bands == channels:
        return np.asarray(img)
    grey = np.asarray(img.convert("L"))
    return np.repeat(grey[:, :, None], channels, axis=2)


def load_image(path: str | os.PathLike[str], cfg: LoaderConfig) -> np.ndarray:
    """Decode ``path`` into an HWC uint8 array with ``cfg.channels`` bands, resized per ``cfg``.

    Raises :class:`ImageLoadError` naming the file and the cause for every failure.
    """
    return load_image_with_size(path, cfg)[0]


def load_image_with_size(
    path: str | os.PathLike[str],
    cfg: LoaderConfig,
    on_bytes: Callable[[bytes, os.stat_result], None] | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`load_image` plus the decoded (width, height) before resizing, for result rows.

    ``on_bytes`` sees the file's bytes once read, before decoding, with the status of the open file
    (the watcher's record of the bytes that were judged, not of a second read or ``stat`` that a
    writer could have changed in between).
    """
    p = Path(path)
    data, st = read_image_file(p, max_file_bytes(cfg.max_pixels))
    if on_bytes is not None:
        on_bytes(data, st)
    img, size = _open(p, data, cfg)
    problem = too_small(*size, cfg)
    if problem:
        raise ImageLoadError(p, "too_small", problem)
    w, h = target_size(*size, cfg)
    return _model_array(img, cfg, w, h), size


def _model_array(img: Image.Image, cfg: LoaderConfig, width: int, height: int) -> np.ndarray:
    """The decoded image as the model's HWC uint8 input of ``width`` x ``height``.

    Grey and colour images are converted and resized as Pillow images, so a large frame is never
    copied into numpy at full size; the result equals :func:`to_channels` then
    :func:`resize_array` (Pillow resizes every band of an RGB image like a grey one), which stay
    the path for high bit depths and band counts other than 1 and 3.
    """
    gap = REDUCING_GAP if cfg.downscale == "fast" else None
    bands = _model_bands(img, cfg.channels)
    if bands is None:
        arr = to_channels(img, cfg.channels)
        if (width, height) != (arr.shape[1], arr.shape[0]):
            arr = resize_array(arr, width, height, reducing_gap=gap)
        return np.ascontiguousarray(arr)
    if bands.size != (width, height):
        bands = bands.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=gap)
    out = np.asarray(bands)
    if out.ndim == 2:
        out = out[:, :, None]
    if out.shape[2] != cfg.channels:  # a grey image for a colour model: replicated after resizing
        out = np.repeat(out, cfg.channels, axis=2)
    return out


def _model_bands(img: Image.Image, channels: int) -> Image.Image | None:
    """``img`` as an 8-bit L or RGB image per the channel rule, or None for the numpy path."""
    mode = img.mode
    if channels not in (1, 3) or mode.startswith("I") or mode == "F":
        return None
    img = _eight_bit(img)
    return img.convert("L") if channels == 1 and img.mode != "L" else img


def _eight_bit(img: Image.Image) -> Image.Image:
    """The channel rule's first step for 8-bit modes: alpha dropped, palette and CMYK to RGB, bilevel to L."""
    if img.mode in ("P", "PA", "CMYK", "YCbCr", "RGBA", "RGBa", "RGBX"):
        return img.convert("RGB")
    if img.mode in ("1", "LA", "La"):
        return img.convert("L")
    return img


def resize_array(
    arr: np.ndarray, width: int, height: int, *, reducing_gap: float | None = None
) -> np.ndarray:
    """Resize HWC uint8 with Pillow's antialiased bilinear filter, band by band if needed."""
    if arr.shape[2] in (1, 3):
        src = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        out = np.asarray(src.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=reducing_gap))
        return out[:, :, None] if out.ndim == 2 else out
    planes = [
        np.asarray(
            Image.fromarray(arr[:, :, c]).resize(
                (width, height), Image.Resampling.BILINEAR, reducing_gap=reducing_gap
            )
        )
        for c in range(arr.shape[2])
    ]
    return np.stack(planes, axis=2)


def normalize_batch(
    images: Sequence[np.ndarray],
    mean: Sequence[float],
    std: Sequence[float],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Stack equally sized HWC uint8 images into NCHW float32, ``(x/255 - mean) / std``.

    Each image is converted in one multiply straight into its slot of the batch (``out``, a
    reusable (N, C, H, W) float32 buffer, or a new one), then shifted in place: float32
    ``x * (1 / (255 std)) - mean / std``, the same operations whoever calls it.
    """
    n, (h, w, c) = len(images), images[0].shape
    if out is None:
        out = np.empty((n, c, h, w), np.float32)
    elif out.shape != (n, c, h, w) or out.dtype != np.float32:
        raise ValueError(f"normalize_batch: out is {out.dtype}{out.shape}, expected float32{(n, c, h, w)}")
    std32 = np.asarray(std, np.float32)
    scale = (1.0 / (255.0 * std32)).reshape(-1, 1, 1)
    shift = (np.asarray(mean, np.float32) / std32).reshape(-1, 1, 1)
    for slot, image in zip(out, images):
        if image.shape != (h, w, c):
            raise ValueError(f"normalize_batch: images differ in shape: {image.shape} and {(h, w, c)}")
        np.multiply(image.transpose(2, 0, 1), scale, out=slot)
        slot -= shift
    return out
