"""The loader's downscale policies on real files: ``exact`` against the reference loader (full decode,
one resize), ``fast`` against Pillow's own draft/reduce, and the policy's validation in model metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from defectscope.runtime.image import (
    LoaderConfig,
    load_image,
    load_image_with_size,
    resize_array,
    target_size,
    to_channels,
)
from defectscope.runtime.metadata import MetadataError, ModelMetadata

GREY = LoaderConfig(channels=1, min_size=4)
RGB = LoaderConfig(channels=3, min_size=4)


def _reference(path: Path, cfg: LoaderConfig) -> np.ndarray:
    """The loader as it was before the downscale policies: full decode, numpy bands, one resize."""
    with Image.open(path) as opened:
        opened.load()
        img = ImageOps.exif_transpose(opened)
    arr = to_channels(img, cfg.channels)
    w, h = target_size(arr.shape[1], arr.shape[0], cfg)
    return resize_array(arr, w, h) if (w, h) != (arr.shape[1], arr.shape[0]) else arr


def _texture(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth shading plus grain, like a surface photo (pure noise would make every filter look bad)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 60 + 100 * (xx / w) + 40 * np.sin(yy / 17.0)
    bands = [base + 20 * c + rng.normal(0, 6, (h, w)) for c in range(channels)]
    arr = np.clip(np.stack(bands, axis=2), 0, 255).astype(np.uint8)
    return arr[:, :, 0] if channels == 1 else arr


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "1", "I;16", "CMYK"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_exact_policy_equals_the_reference_loader(tmp_path: Path, mode: str, channels: int) -> None:
    rgb = Image.fromarray(_texture(100, 150, 3))
    img = Image.fromarray(_texture(100, 150, 1)).convert("I;16") if mode == "I;16" else rgb.convert(mode)
    p = tmp_path / f"img.{'tiff' if mode == 'CMYK' else 'png'}"
    img.save(p)
    for cfg in (
        LoaderConfig(channels=channels, min_size=8),  # no resize
        LoaderConfig(channels=channels, max_side=64, min_size=8, size_multiple=8),  # 2.3x smaller
        LoaderConfig(channels=channels, max_side=140, min_size=8),  # slightly smaller
    ):
        got, size = load_image_with_size(p, cfg)
        want = _reference(p, cfg)
        assert size == (150, 100)
        assert got.dtype == want.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_exact_policy_equals_the_reference_on_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "frame.jpg"
    Image.fromarray(_texture(480, 640, 3)).save(p, quality=90)
    for channels in (1, 3):
        cfg = LoaderConfig(channels=channels, max_side=128, size_multiple=32)
        np.testing.assert_array_equal(load_image(p, cfg), _reference(p, cfg))


def test_fast_policy_changes_nothing_unless_an_image_shrinks_twofold(tmp_path: Path) -> None:
    png, jpg = tmp_path / "a.png", tmp_path / "a.jpg"
    Image.fromarray(_texture(200, 300, 3)).save(png)
    Image.fromarray(_texture(200, 300, 1)).save(jpg, quality=90)
    for channels in (1, 3):
        for max_side in (None, 256, 160):  # factors 1, 1.17, 1.9
            exact = LoaderConfig(channels=channels, max_side=max_side, size_multiple=16)
            fast = LoaderConfig(channels=channels, max_side=max_side, size_multiple=16, downscale="fast")
            for p in (png, jpg):
                np.testing.assert_array_equal(load_image(p, fast), load_image(p, exact))


def test_fast_policy_box_reduces_a_large_png_before_the_resize(tmp_path: Path) -> None:
    p = tmp_path / "frame.png"
    Image.fromarray(_texture(480, 640, 1)).save(p)
    fast = LoaderConfig(channels=1, max_side=128, downscale="fast")
    got = load_image(p, fast)
    with Image.open(p) as img:
        want = np.asarray(img.resize((128, 96), Image.Resampling.BILINEAR, reducing_gap=2.0))[:, :, None]
    np.testing.assert_array_equal(got, want)
    exact = load_image(p, LoaderConfig(channels=1, max_side=128))
    diff = np.abs(got.astype(int) - exact.astype(int))
    assert 0 < diff.max() <= 8 and diff.mean() < 1.0  # other pixels, the same picture


@pytest.mark.parametrize("channels", [1, 3])
def test_fast_policy_decodes_a_large_jpeg_at_dct_scale(tmp_path: Path, channels: int) -> None:
    p = tmp_path / "frame.jpg"
    Image.fromarray(_texture(1024, 1224, 3)).save(p, quality=90)
    fast = LoaderConfig(channels=channels, max_side=256, size_multiple=32, downscale="fast")
    got, size = load_image_with_size(p, fast)
    assert size == (1224, 1024)  # rows report the file's size, not the reduced decode
    w, h = target_size(1224, 1024, fast)
    with Image.open(p) as img:
        img.draft("L" if channels == 1 else "RGB", (w, h))  # libjpeg scales by 1/4: 306x256
        assert img.size == (306, 256)
        want = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0))
    np.testing.assert_array_equal(got, want.reshape(h, w, channels))
    exact = load_image(p, LoaderConfig(channels=channels, max_side=256, size_multiple=32))
    diff = np.abs(got.astype(int) - exact.astype(int))
    assert diff.max() <= 12 and diff.mean() < 1.5


def test_fast_policy_reads_an_rgb_jpeg_as_its_luma_for_grey_models(tmp_path: Path) -> None:
    p = tmp_path / "colour.jpg"
    Image.fromarray(_texture(120, 160, 3)).save(p, quality=90)
    got = load_image(p, LoaderConfig(channels=1, downscale="fast"))
    with Image.open(p) as img:
        img.draft("L", img.size)
        want = np.asarray(img)[:, :, None]
    np.testing.assert_array_equal(got, want)
    exact = load_image(p, LoaderConfig(channels=1))
    assert np.abs(got.astype(int) - exact.astype(int)).max() <= 2


def test_fast_policy_keeps_exif_orientation_when_drafting(tmp_path: Path) -> None:
    arr = np.zeros((400, 800), np.uint8)  # 800 wide; left half black, right half white
    arr[:, 400:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: 400 wide, 800 high, black on top
    p = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(p, exif=exif.tobytes(), quality=95)
    fast = LoaderConfig(channels=1, max_side=100, downscale="fast")
    got, size = load_image_with_size(p, fast)
    assert size == (400, 800) and got.shape == (100, 50, 1)
    assert got[10, 25, 0] < 30 and got[90, 25, 0] > 225
    exact = load_image(p, LoaderConfig(channels=1, max_side=100))
    assert np.abs(got.astype(int) - exact.astype(int)).mean() < 3


def test_downscale_policy_is_validated_and_old_models_read_exact() -> None:
    with pytest.raises(ValueError, match="downscale must be one of exact, fast, got 'quick'"):
        LoaderConfig(downscale="quick")
    loader = {"channels": 1, "max_side": 512, "min_size": 32, "size_multiple": 32, "max_pixels": 10**7}
    doc = {
        "class_names": ["good", "bad"], "good_class": "good", "threshold": 0.5, "loader": loader,
        "mean": [0.5], "std": [0.25], "model_name": "m", "package_version": "0",
        "format": "defectscope.model", "format_version": 2,
    }  # fmt: skip
    v1 = {**{k: v for k, v in doc.items() if k != "loader"}, **loader, "format_version": 1}
    for old in (doc, v1):  # exported before the field existed: the one policy there was
        assert ModelMetadata.from_json(json.dumps(old)).loader.downscale == "exact"
    fast = {**doc, "loader": {**loader, "downscale": "fast"}}
    meta = ModelMetadata.from_json(json.dumps(fast))
    assert meta.loader.downscale == "fast"
    assert ModelMetadata.from_json(meta.to_json()) == meta
    # written only when it is not the default: an "exact" model stays readable by older runners,
    # which refuse a "fast" one (unknown loader key) rather than preprocess it the exact way
    assert json.loads(meta.to_json())["loader"]["downscale"] == "fast"
    exact = ModelMetadata.from_json(json.dumps(doc))
    assert json.loads(exact.to_json())["loader"] == loader
    with pytest.raises(MetadataError, match="downscale must be one of exact, fast, got 'lanczos'"):
        ModelMetadata.from_json(json.dumps({**doc, "loader": {**loader, "downscale": "lanczos"}}))
    with pytest.raises(MetadataError, match="optionally also downscale"):
        ModelMetadata.from_json(json.dumps({**doc, "loader": {**loader, "filter": "bicubic"}}))


# --------------------------------------------------------------------------- normalisation
