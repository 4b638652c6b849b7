"""``loader.upscale_to``: small images enlarged before the model, the same way in training, export and the
line runtime; the rule travels in the model and is checked like every loader field read from a file."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from defectscope.data.settings import loader_config
from defectscope.runtime.image import ImageLoadError, LoaderConfig, load_image, normalize_batch, target_size
from defectscope.runtime.metadata import MetadataError, ModelMetadata


def test_the_short_side_is_enlarged_and_the_long_side_stays_capped() -> None:
    up = LoaderConfig(upscale_to=384)
    assert target_size(300, 300, up) == (384, 384)
    assert target_size(300, 150, up) == (768, 384)  # aspect kept
    assert target_size(500, 400, up) == (500, 400)  # already large enough: untouched
    capped = LoaderConfig(upscale_to=384, max_side=640, size_multiple=32)
    assert target_size(300, 600, capped) == (320, 640)  # max_side wins over the enlargement
    assert target_size(300, 300, LoaderConfig(upscale_to=700, max_side=512)) == (512, 512)
    # the area is capped too: a long thin strip must not become a gigapixel input
    w, h = target_size(32, 100_000, up)
    assert (w, h) == (113, 353_553) and w * h <= up.max_pixels
    w, h = target_size(300, 300, LoaderConfig(upscale_to=65_536))  # a model file may ask for anything
    assert w == h == 6324 and w * h <= LoaderConfig().max_pixels
    for side in range(32, 384):  # exactly the target short side, whatever the float rounding
        assert target_size(side, 2 * side, up) == (384, 2 * 384)
    assert target_size(1000, 900, capped) == (640, 576)  # the downscale as before
    assert target_size(300, 300, LoaderConfig()) == (300, 300)  # off by default


def test_the_runtime_enlarges_with_the_bilinear_filter(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = (rng.random((50, 80)) * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "a.png")
    got = load_image(tmp_path / "a.png", LoaderConfig(upscale_to=100))
    want = np.asarray(Image.fromarray(grey).resize((160, 100), Image.Resampling.BILINEAR))
    assert got.shape == (100, 160, 1)
    np.testing.assert_array_equal(got[:, :, 0], want)
    Image.fromarray(grey).save(tmp_path / "a.jpg", quality=95)  # the fast policy enlarges like exact
    fast, exact = (
        load_image(tmp_path / "a.jpg", LoaderConfig(upscale_to=100, downscale=d)) for d in ("fast", "exact")
    )
    np.testing.assert_array_equal(fast, exact)


def test_min_size_is_judged_on_the_real_pixels(tmp_path: Path) -> None:
    Image.new("L", (20, 40)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageLoadError, match=r"tiny\.png.*20x40; the minimum side is 32 px") as err:
        load_image(tmp_path / "tiny.png", LoaderConfig(upscale_to=384))
    assert err.value.kind == "too_small"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"upscale_to must be >= 1 or None, got 0"):
        LoaderConfig(upscale_to=0)


@pytest.mark.parametrize(
    ("loader", "message"),
    [
        ({"upscale_to": 1.5}, r"^data\.loader\.upscale_to must be a whole number in \[1, 65536\], got 1\.5$"),
        ({"upscale_to": True}, r"^data\.loader\.upscale_to must be a whole number .*got True$"),
        ({"max_side": "512"}, r"^data\.loader\.max_side must be a whole number .*got '512'$"),
        (
            {"upscale": 384},
            r"^data\.loader: unknown key\(s\) \['upscale'\]; valid: channels, .*, upscale_to$",
        ),
        (
            {"max_side": 20},
            r"^data\.loader\.max_side \(20\) must be >= min_size \(32\)$",
        ),
    ],
)
def test_config_values_no_model_could_carry_are_refused_naming_the_key(
    loader: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        loader_config(loader)
    assert loader_config({"upscale_to": 384}).upscale_to == 384


@pytest.mark.parametrize("command", ["train", "scan"])
def test_the_cli_refuses_a_bad_value_before_any_work(
    command: str, tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    run = subprocess.run(
        [*defectscope_cmd, command, "experiment=smoke", "logger=none", "data.loader.upscale_to=1.5",
         f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}"],
        env=cli_env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"defectscope {command}: error: data.loader.upscale_to must be a whole number in [1, 65536], got 1.5"
    )
    assert "Traceback" not in run.stderr and not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "data").exists()  # nothing generated either


def _doc(**loader_extra: Any) -> dict[str, Any]:
    loader = {"channels": 1, "max_side": None, "min_size": 32, "size_multiple": 1, "max_pixels": 10**7}
    return {
        "class_names": ["good", "bad"], "good_class": "good", "threshold": 0.5, "loader": {**loader, **loader_extra},
        "mean": [0.5], "std": [0.25], "model_name": "m", "package_version": "0",
        "format": "defectscope.model", "format_version": 2,
    }  # fmt: skip


@pytest.mark.parametrize("bad", [True, "384", -1, 0, 1 << 17, 384.0, [384]])
def test_a_model_file_cannot_smuggle_a_bad_value(bad: Any) -> None:
    with pytest.raises(MetadataError, match=r"loader\.upscale_to must be a whole number in \[1, 65536\]"):
        ModelMetadata.from_json(json.dumps(_doc(upscale_to=bad)))


def test_the_field_is_written_only_when_set() -> None:
    old = ModelMetadata.from_json(json.dumps(_doc()))  # a model from before the field: never enlarged
    assert old.loader.upscale_to is None and "upscale_to" not in json.loads(old.to_json())["loader"]
    new = ModelMetadata.from_json(json.dumps(_doc(upscale_to=384)))
    assert new.loader.upscale_to == 384 and json.loads(new.to_json())["loader"]["upscale_to"] == 384
    assert ModelMetadata.from_json(json.dumps(_doc(upscale_to=None))).loader.upscale_to is None


@pytest.mark.slow
def test_trained_exported_and_inspected_at_the_enlarged_size(
    compose_train: Callable[..., Any],
    smoke_data_dir: Path,
    tmp_path: Path,
    defectscope_cmd: list[str],
    cli_env: dict[str, str],
) -> None:
    from defectscope.runtime.inspector import Inspector
    from test_multiscale import train_smoke_recording_shapes

    shapes, _ = train_smoke_recording_shapes(
        compose_train, smoke_data_dir, tmp_path, 1, "data.loader.upscale_to=128"
    )
    up = LoaderConfig(upscale_to=128, size_multiple=32)  # the smoke set: sides of 64-96 px, on a 32 px grid
    enlarged = set()
    for path in smoke_data_dir.rglob("*.png"):
        with Image.open(path) as img:
            w, h = target_size(*img.size, up)
            enlarged.add((h, w))
    assert min(min(s) for s in enlarged) == 128
    assert (
        shapes.seen["train"] <= enlarged and shapes.seen["val"] <= enlarged and len(shapes.seen["train"]) > 1
    )

    model = tmp_path / "m.onnx"
    run = subprocess.run(
        [*defectscope_cmd, "export", str(tmp_path / "checkpoints" / "last.ckpt"), "-o", str(model)],
        env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    images = sorted(smoke_data_dir.rglob("*.png"))[:6]
    out = tmp_path / "rows.jsonl"
    run = subprocess.run(
        [*defectscope_cmd, "inspect", str(model), *map(str, images), "-o", str(out), "--provider", "cpu"],
        env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}

    inspector = Inspector(model, provider="cpu", threads=1)
    meta = inspector.metadata
    assert meta.loader.upscale_to == 128
    native = LoaderConfig(**{**meta.loader.to_dict(), "upscale_to": None})
    gaps = []
    for path in images:
        row = rows[str(path)]
        probs = np.array([row["probs"][c] for c in meta.class_names])
        enlarged, small = (load_image(path, c) for c in (meta.loader, native))
        assert min(enlarged.shape[:2]) >= 128 > min(small.shape[:2])
        got = [
            inspector.predict(normalize_batch([a], meta.mean, meta.std), cam=False)["probs"][0]
            for a in (enlarged, small)
        ]
        np.testing.assert_allclose(probs, got[0], atol=1e-5)  # the runtime enlarged as training did
        gaps.append(np.abs(probs - got[1]).max())
    assert max(gaps) > 1e-3  # and the enlargement changes what the model says (the check above can tell)
