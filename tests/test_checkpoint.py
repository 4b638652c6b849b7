"""load_checkpoint: plain-data checkpoints back to eval-mode models, clear errors otherwise."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

from defectscope.checkpoint import CheckpointError, load_checkpoint
from defectscope.models import create_model
from defectscope.runtime.files import file_sha256
from test_export_support import build_preset, checkpoint_info, model_presets, randomize, write_checkpoint

PRESETS = model_presets()


def _saved(
    tmp_path: Path, preset: str = "resnet_small", **info_overrides: object
) -> tuple[torch.nn.Module, Path]:
    model = randomize(build_preset(PRESETS[preset], num_classes=4, in_chans=3), seed=3)
    info = checkpoint_info(PRESETS[preset]["name"], model.model_kwargs, channels=3)
    info.update(info_overrides)
    return model, write_checkpoint(tmp_path / "best.ckpt", model, info)


def test_round_trip_rebuilds_the_trained_network(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    loaded, info = load_checkpoint(path)
    assert type(loaded) is type(model) and not loaded.training
    assert info["model_name"] == "resnet" and info["model_kwargs"]["num_classes"] == 4
    assert info["class_names"] == ["good", "crack", "scratch", "spot"]
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        assert torch.equal(model.eval()(x), loaded(x))
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    assert len(file_sha256(path)) == 64


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.ckpt: checkpoint file does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(
        CheckpointError, match=r"notes\.ckpt: not a readable PyTorch checkpoint \(neither a zip"
    ):
        load_checkpoint(text)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, plain)
    with pytest.raises(
        CheckpointError, match=r"plain\.ckpt: not a defectscope checkpoint \(no 'defectscope'"
    ):
        load_checkpoint(plain)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"defectscope": {}, "cfg": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(CheckpointError, match="weights_only=True") as refused:
        load_checkpoint(pickled)
    assert "Unsupported global: GLOBAL argparse.Namespace" in str(refused.value)  # what it would have run
    assert "weights_only set to False" not in str(refused.value)  # torch's advice is not passed on
    legacy = tmp_path / "legacy.ckpt"  # torch.save's pre-zip format still reaches the checks
    torch.save({"state_dict": {}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.ckpt: not a defectscope checkpoint"):
        load_checkpoint(legacy)


def test_a_cut_off_copy_is_called_truncated(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    whole = path.read_bytes()
    for keep in (len(whole) // 2, len(whole) - 1, 100):
        cut = tmp_path / f"cut{keep}.ckpt"
        cut.write_bytes(whole[:keep])
        with pytest.raises(CheckpointError, match=rf"cut{keep}\.ckpt is truncated: a zip archive whose end"):
            load_checkpoint(cut)
    load_checkpoint(path)  # the whole file still loads
    padded = tmp_path / "padded.ckpt"  # bytes after the end record: torch and zipfile read it, so do we
    padded.write_bytes(whole + bytes(10))
    load_checkpoint(padded)


def test_unknown_model_lists_valid_names(tmp_path: Path) -> None:
    _, path = _saved(tmp_path, model_name="resnet9000")
    with pytest.raises(CheckpointError, match=r"unknown model 'resnet9000'.*efficientnet_lite0.*resnet"):
        load_checkpoint(path)


def test_bad_info_and_mismatched_weights(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["defectscope"].pop("loader")
    torch.save(ckpt, tmp_path / "noloader.ckpt")
    with pytest.raises(CheckpointError, match=r"lacks key.*loader"):
        load_checkpoint(tmp_path / "noloader.ckpt")

    ckpt = torch.load(path, weights_only=True)
    ckpt["defectscope"]["format_version"] = 7
    torch.save(ckpt, tmp_path / "future.ckpt")
    with pytest.raises(CheckpointError, match="format_version 7 is not supported"):
        load_checkpoint(tmp_path / "future.ckpt")

    ckpt = torch.load(path, weights_only=True)
    ckpt["defectscope"]["model_kwargs"]["widths"] = [8, 16, 32, 64]  # weights were trained wider
    torch.save(ckpt, tmp_path / "narrow.ckpt")
    with pytest.raises(
        CheckpointError, match=r"weights do not fit model 'resnet': \d+ missing key\(s\) \(first: "
    ) as exc:
        load_checkpoint(tmp_path / "narrow.ckpt")
    # one line of counts and first examples, not torch's list of every key over many lines
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 500

    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["model.extra"] = torch.zeros(1)  # strict loading: unexpected keys fail
    torch.save(ckpt, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\) \(first: extra\)"):
        load_checkpoint(tmp_path / "extra.ckpt")

    ckpt = torch.load(path, weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
    torch.save(ckpt, tmp_path / "nan.ckpt")  # export failed its parity gate on it, after the export's work
    with pytest.raises(
        CheckpointError, match=rf"nan.ckpt: weights are not finite \(NaN or inf\) in {name[6:]}"
    ):
        load_checkpoint(tmp_path / "nan.ckpt")

    ckpt = torch.load(path, weights_only=True)
    ckpt["defectscope"]["model_kwargs"]["colour"] = "red"
    torch.save(ckpt, tmp_path / "kw.ckpt")
    with pytest.raises(CheckpointError, match=r"cannot build model 'resnet'.*colour"):
        load_checkpoint(tmp_path / "kw.ckpt")


def test_model_kwargs_recorded_by_create_model_rebuild_it(tmp_path: Path) -> None:
    """Training stores ``model.model_kwargs`` (includes num_classes/in_chans) — that must suffice."""
    model: Any = create_model("gapcnn", num_classes=2, in_chans=1, stages=[{"channels": 8, "stride": 2}])
    info = checkpoint_info("gapcnn", model.model_kwargs, class_names=["good", "bad"])
    loaded, _ = load_checkpoint(write_checkpoint(tmp_path / "g.ckpt", model, info))
    assert loaded.num_classes == 2 and loaded.in_chans == 1


def test_a_weight_mismatch_reads_as_counts_and_first_examples() -> None:
    from defectscope.checkpoint import mismatch

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    state = {"0.weight": torch.zeros(4, 3), "0.bias": torch.zeros(4), "9.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError) as exc:
        net.load_state_dict(state, strict=True)
    assert mismatch(exc.value) == (
        "2 missing key(s) (first: 1.weight); 1 unexpected key(s) (first: 9.weight); 2 shape mismatch(es) "
        "(first: 0.weight, torch.Size([4, 3]) in the file, torch.Size([2, 3]) in the model)"
    )


@pytest.mark.parametrize("value", [1e-7, 0.5, 1.0, 0.0, -0.1, 1.01, float("nan")])
def test_every_reader_holds_a_recall_target_to_one_rule(value: float) -> None:
    """Training's config check, the threshold search, export's option and the checkpoint reader agree on
    which recall targets exist (training accepted 1e-7 and the reader then refused the checkpoint it wrote)."""
    import argparse as _argparse

    from defectscope.checkpoint import recall_target
    from defectscope.evaluation.metrics import choose_threshold
    from defectscope.export.cli import _recall
    from defectscope.plain import PlainDataError
    from defectscope.training.config import TrainingConfigError, threshold_settings

    verdicts = []
    for check, refusal in (
        (lambda v: threshold_settings({"target_recall": v}, 0.1), TrainingConfigError),
        (lambda v: choose_threshold([0.2, 0.9], [False, True], v), ValueError),
        (lambda v: _recall(repr(v)), _argparse.ArgumentTypeError),
        (lambda v: recall_target(v, "info.target_recall"), PlainDataError),
    ):
        try:
            check(value)
            verdicts.append(True)
        except refusal as exc:
            assert "recall target in (0, 1]" in str(exc)
            verdicts.append(False)
    assert verdicts == [0.0 < value <= 1.0] * 4
