"""The shared loader on real files: every bad-file kind, every pixel mode, EXIF and each format;
and the batch normalisation (the downscale policies: test_image_loader_policies.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.runtime.image import (
    ERROR_KINDS,
    ImageLoadError,
    LoaderConfig,
    load_image,
    normalize_batch,
    target_size,
)

GREY = LoaderConfig(channels=1, min_size=4)
RGB = LoaderConfig(channels=3, min_size=4)


def _png(path: Path, size: tuple[int, int] = (40, 30), mode: str = "L") -> Path:
    Image.new(mode, size, 128).save(path)
    return path


def _load_error(path: Path, cfg: LoaderConfig = GREY) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path, cfg)
    err = info.value
    assert err.kind in ERROR_KINDS
    assert str(path) in str(err) and err.path == str(path)
    return err


# --------------------------------------------------------------------------- bad files


def test_zero_bytes(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    err = _load_error(p)
    assert err.kind == "zero_bytes" and "empty" in str(err)


def test_files_that_are_no_image_are_refused_without_reading_them(tmp_path: Path) -> None:
    """A named pipe blocked the reader for good and a link to a device or a huge file was read whole:
    each is refused from its status alone (a sparse file takes no disk; read, 64 GiB would not fit)."""
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    assert _load_error(pipe).kind == "not_a_file"
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    assert _load_error(tmp_path / "zero.png").kind == "not_a_file"
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(64 << 30)
    err = _load_error(huge, LoaderConfig(channels=1, min_size=4, max_pixels=100_000))
    assert err.kind == "too_large" and f"{64 << 30} bytes" in str(err)


def test_png_without_its_end_chunk_is_truncated(tmp_path: Path) -> None:
    """A writer that sizes the file first leaves zeros where the end chunk goes; Pillow decodes them."""
    good = _png(tmp_path / "g.png", (64, 64))
    data = good.read_bytes()
    p = tmp_path / "presized.png"
    p.write_bytes(data[:-12] + b"\0" * 12)
    err = _load_error(p)
    assert err.kind == "truncated" and "IEND" in str(err)


def test_truncated(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (200, 200), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    err = _load_error(p)
    assert err.kind == "truncated" and "truncated" in str(err)


def test_truncated_jpeg(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(good, quality=90)
    p = tmp_path / "cut.jpg"
    p.write_bytes(good.read_bytes()[:3000])
    assert _load_error(p).kind == "truncated"


def test_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("this is a text file, not a PNG\n")
    err = _load_error(p)
    assert err.kind == "not_an_image" and "not a recognised image" in str(err)


def test_unsupported_mode_lab_tiff(tmp_path: Path) -> None:
    p = tmp_path / "lab.tif"
    Image.new("LAB", (40, 40), (50, 0, 0)).save(p)
    err = _load_error(p)
    assert err.kind == "unsupported_mode" and "'LAB'" in str(err)


def test_too_large(tmp_path: Path) -> None:
    p = _png(tmp_path / "big.png", (100, 100))
    err = _load_error(p, LoaderConfig(channels=1, min_size=4, max_pixels=5000))
    assert err.kind == "too_large" and "100x100 = 10000 pixels exceeds the limit of 5000" in str(err)


def test_too_small(tmp_path: Path) -> None:
    p = _png(tmp_path / "tiny.png", (20, 50))
    err = _load_error(p, LoaderConfig(channels=1, min_size=32))
    assert err.kind == "too_small" and "20x50" in str(err) and "minimum side is 32" in str(err)


def test_too_small_after_downscale(tmp_path: Path) -> None:
    p = _png(tmp_path / "strip.png", (400, 40))
    err = _load_error(p, LoaderConfig(channels=1, min_size=32, max_side=200))
    assert err.kind == "too_small" and "becomes 200x20" in str(err)


def test_missing(tmp_path: Path) -> None:
    err = _load_error(tmp_path / "gone.png")
    assert err.kind == "vanished" and "does not exist" in str(err)


def test_vanished_between_listing_and_loading(tmp_path: Path) -> None:
    p = _png(tmp_path / "brief.png")
    listed = sorted(tmp_path.iterdir())
    p.unlink()
    assert _load_error(listed[0]).kind == "vanished"


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "folder.png"
    d.mkdir()
    err = _load_error(d)
    assert err.kind == "is_directory" and "directory" in str(err)


def test_unreadable(tmp_path: Path) -> None:
    p = _png(tmp_path / "locked.png")
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reading")
        err = _load_error(p)
        assert err.kind == "unreadable" and "cannot be read" in str(err)
    finally:
        p.chmod(0o644)


def test_unreadable_even_as_root(tmp_path: Path) -> None:
    """An OS error that root gets too (a file used as a folder): the same 'unreadable' row, with the reason."""
    p = _png(tmp_path / "flat.png") / "inside.png"
    err = _load_error(p)
    assert err.kind == "unreadable" and "cannot be read" in str(err) and "Not a directory" in str(err)


# --------------------------------------------------------------------------- modes


def _roundtrip(tmp_path: Path, img: Image.Image, name: str, cfg: LoaderConfig = GREY) -> np.ndarray:
    p = tmp_path / name
    img.save(p)
    out = load_image(p, cfg)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == cfg.channels
    assert out.shape[:2] == (img.height, img.width)
    return out


def _pattern(h: int = 8, w: int = 12) -> np.ndarray:
    return (np.arange(h * w, dtype=np.int64).reshape(h, w) * 7 % 256).astype(np.uint8)


def test_mode_L(tmp_path: Path) -> None:
    a = _pattern()
    out = _roundtrip(tmp_path, Image.fromarray(a), "l.png")
    np.testing.assert_array_equal(out[:, :, 0], a)
    rgb = _roundtrip(tmp_path, Image.fromarray(a), "l3.png", RGB)
    for c in range(3):  # grey replicated
        np.testing.assert_array_equal(rgb[:, :, c], a)


def test_mode_LA_discards_alpha(tmp_path: Path) -> None:
    a = _pattern()
    la = Image.merge("LA", [Image.fromarray(a), Image.new("L", (12, 8), 0)])
    out = _roundtrip(tmp_path, la, "la.png")
    np.testing.assert_array_equal(out[:, :, 0], a)  # not composited onto black


def test_mode_RGB(tmp_path: Path) -> None:
    rgb = np.stack([_pattern(), 255 - _pattern(), np.full((8, 12), 40, np.uint8)], axis=2)
    img = Image.fromarray(rgb)
    np.testing.assert_array_equal(_roundtrip(tmp_path, img, "rgb.png", RGB), rgb)
    grey = _roundtrip(tmp_path, img, "rgb1.png")
    np.testing.assert_array_equal(grey[:, :, 0], np.asarray(img.convert("L")))  # ITU-R 601-2 luma


def test_mode_RGBA_discards_alpha(tmp_path: Path) -> None:
    rgb = np.stack([_pattern(), 255 - _pattern(), np.full((8, 12), 40, np.uint8)], axis=2)
    rgba = np.concatenate([rgb, np.zeros((8, 12, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(_roundtrip(tmp_path, Image.fromarray(rgba), "rgba.png", RGB), rgb)


def test_mode_P(tmp_path: Path) -> None:
    img = Image.new("P", (12, 8))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (253 * 3))
    img.putdata([1 if (i % 12) < 6 else 2 for i in range(96)])
    out = _roundtrip(tmp_path, img, "p.png", RGB)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 11]) == (0, 0, 255)


def test_mode_CMYK(tmp_path: Path) -> None:
    img = Image.new("CMYK", (12, 8), (0, 255, 255, 0))  # pure red ink mix
    out = _roundtrip(tmp_path, img, "cmyk.tif", RGB)
    np.testing.assert_array_equal(out[0, 0], np.asarray(img.convert("RGB"))[0, 0])
    assert tuple(out[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_mode_I16_scaled_not_wrapped(tmp_path: Path, ext: str) -> None:
    values = np.array([[0, 257, 32896, 65535, 1000, 65280, 256, 512]] * 4, np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    out = _roundtrip(tmp_path, img, f"i16.{ext}", LoaderConfig(channels=1, min_size=4))
    expected = np.rint(values * 255.0 / 65535.0).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    assert out[0, 5, 0] == 254  # 65280 would wrap to 0


def test_mode_I_32bit(tmp_path: Path) -> None:
    in_range = np.array([[0, 65535, 257, 1000]] * 4, np.int32)
    out = _roundtrip(tmp_path, Image.fromarray(in_range), "i32a.tif", LoaderConfig(channels=1, min_size=4))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 1, 4])
    wide = np.array([[-100, 0, 100_000, 24_925]] * 4, np.int32)
    out = _roundtrip(tmp_path, Image.fromarray(wide), "i32b.tif", LoaderConfig(channels=1, min_size=4))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 255, 64])  # min-max scaled, not clipped


def test_mode_F(tmp_path: Path) -> None:
    unit = np.array([[0.0, 0.5, 1.0, 0.25]] * 4, np.float32)
    out = _roundtrip(tmp_path, Image.fromarray(unit), "f1.tif", LoaderConfig(channels=1, min_size=4))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 64])
    wide = np.array([[-2.0, 0.0, 2.0, 6.0]] * 4, np.float32)
    out = _roundtrip(tmp_path, Image.fromarray(wide), "f2.tif", LoaderConfig(channels=3, min_size=4))
    np.testing.assert_array_equal(out[0, :, 0], [0, 64, 128, 255])
    assert (out[:, :, 0] == out[:, :, 2]).all()


def test_mode_1(tmp_path: Path) -> None:
    img = Image.fromarray(np.tile(np.array([[0, 255]], np.uint8), (8, 6))).convert("1")
    assert img.mode == "1"
    out = _roundtrip(tmp_path, img, "bw.png")
    assert set(np.unique(out)) == {0, 255} and out[0, 0, 0] == 0 and out[0, 1, 0] == 255


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # 60 wide x 40 high, left half black, right half white; EXIF 6 = display rotated 90° clockwise.
    a = np.zeros((40, 60), np.uint8)
    a[:, 30:] = 255
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes(), quality=95)
    out = load_image(p, GREY)
    assert out.shape == (60, 40, 1)  # H and W swapped
    assert out[5, 20, 0] < 30 and out[55, 20, 0] > 225  # top was the left (black) side


@pytest.mark.parametrize(
    "fmt, ext, kwargs, tol",
    [
        ("JPEG", "jpg", {"quality": 95}, 12),
        ("BMP", "bmp", {}, 0),
        ("TIFF", "tiff", {}, 0),
        ("WEBP", "webp", {"lossless": True}, 0),
    ],
)
def test_formats_decode(tmp_path: Path, fmt: str, ext: str, kwargs: dict, tol: int) -> None:
    yy, xx = np.mgrid[0:48, 0:64]
    rgb = np.stack([xx * 4, yy * 5, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    p = tmp_path / f"img.{ext}"
    Image.fromarray(rgb).save(p, format=fmt, **kwargs)
    out = load_image(p, RGB)
    assert out.shape == (48, 64, 3)
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= tol


def test_resize_policy_rounds_to_multiple_and_caps_long_side(tmp_path: Path) -> None:
    cfg = LoaderConfig(channels=1, max_side=256, min_size=32, size_multiple=32)
    assert target_size(1000, 500, cfg) == (256, 128)
    assert target_size(100, 70, cfg) == (96, 64)
    p = _png(tmp_path / "wide.png", (1000, 500))
    assert load_image(p, cfg).shape == (128, 256, 1)


# --------------------------------------------------------------------------- downscale policies


def test_normalize_batch_into_a_buffer() -> None:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(4)]
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.25, 0.3]
    std32, mean32 = np.asarray(std, np.float32), np.asarray(mean, np.float32)
    want = (np.stack(images).astype(np.float32) * (1.0 / (255.0 * std32)) - mean32 / std32).transpose(
        0, 3, 1, 2
    )
    fresh = normalize_batch(images, mean, std)
    buffer = np.full((4, 3, 5, 7), np.nan, np.float32)
    into = normalize_batch(images, mean, std, out=buffer)
    assert into is buffer and fresh.shape == (4, 3, 5, 7) and fresh.flags.c_contiguous
    np.testing.assert_array_equal(fresh, want)
    np.testing.assert_array_equal(into, want)
    with pytest.raises(ValueError, match="expected float32"):
        normalize_batch(images, mean, std, out=np.empty((4, 3, 7, 5), np.float32))
    with pytest.raises(ValueError, match="images differ in shape"):
        normalize_batch([images[0], images[1][:4]], mean, std)
