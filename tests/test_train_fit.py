"""In-process training: a short fit for every model preset and norm type, checkpoints, threshold,
class weights, geometry check, fine-tuning warm-up, AGC and determinism (train(cfg) on composed configs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from conftest import CONF
from defectscope.evaluation.metrics import choose_threshold as shared_choose_threshold
from defectscope.runtime.decision import defect_probability, is_defect_label, ng_indices
from defectscope.training.config import TrainingConfigError
from defectscope.training.metrics import choose_threshold, operating_point
from defectscope.training.train import build_module, train

CONTRACT_KEYS = {
    "format_version",
    "model_name",
    "model_kwargs",
    "class_names",
    "good_class",
    "threshold",
    "loader",
    "mean",
    "std",
    "mlflow_run_id",
    "mlflow_tracking_uri",
    "val_paths",
    "val_labels",
    "ng_classes",
    "target_recall",
    "warn_false_reject_rate",
    "threshold_report",
    "package_version",
    "grading",
    "teacher_sha256",
}
SHORT = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=1",
]
PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
NORMS = ("batch", "group", "layer", "instance", "none")


def smoke_cfg(compose_train: Callable[..., Any], data_dir: Path, out: Path, *extra: str) -> Any:
    return compose_train(
        [
            "experiment=smoke",
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={out}",
            f"paths.launch_dir={out}",
            "logger=none",
            "trainer.enable_progress_bar=false",
            *extra,
        ]
    )


def _is_plain(x: Any) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_is_plain(v) for v in x)
    return x is None or isinstance(x, str | int | float | bool)


def check_checkpoint(path: Path, preset_name: str | None = None) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    info = ckpt["defectscope"]
    assert set(info) == CONTRACT_KEYS
    assert _is_plain(info) and info["format_version"] == 1
    assert (
        info["model_kwargs"]["num_classes"] == len(info["class_names"]) and "in_chans" in info["model_kwargs"]
    )
    assert info["good_class"] in info["class_names"] and 0.0 <= info["threshold"] <= 1.0
    assert 0 < len(info["val_paths"]) <= 512 and all(Path(p).is_file() for p in info["val_paths"])
    assert len(info["mean"]) == len(info["std"]) == info["loader"]["channels"]
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    if preset_name:
        assert info["model_name"] == preset_name
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_short_fit_every_model_preset(
    preset: str, compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    from defectscope.checkpoint import load_checkpoint

    cfg = smoke_cfg(compose_train, smoke_data_dir, tmp_path, f"model={preset}", *SHORT)
    metrics = train(cfg)
    assert {"val/bal_acc", "val/threshold", "test/acc", "test/escape_rate", "train/loss"} <= set(metrics)
    for name in ("best.ckpt", "last.ckpt"):
        check_checkpoint(tmp_path / "checkpoints" / name, str(cfg.model.name))
    model: Any
    model, info = load_checkpoint(tmp_path / "checkpoints" / "best.ckpt")  # export's reader
    x = torch.zeros(2, info["model_kwargs"]["in_chans"], 64, 96)
    assert model(x).shape == (2, len(info["class_names"]))
    assert model.cam(x).shape[:2] == (2, len(info["class_names"]))
    assert (tmp_path / "plots" / "misclassified.png").is_file() and (
        tmp_path / "config_resolved.yaml"
    ).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
def test_short_fit_every_norm(
    norm: str, compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    cfg = smoke_cfg(
        compose_train,
        smoke_data_dir,
        tmp_path,
        "model=resnet_small",
        f"model.norm={norm}",
        *SHORT,
        "test=false",
        "data.loader.min_size=64",  # instance norm needs 33 px (a 2×2 final map); the same data for all
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ckpt = check_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert ckpt["defectscope"]["model_kwargs"]["norm"] == norm
    has_bn = any("running_mean" in k for k in ckpt["state_dict"])
    assert has_bn == (norm == "batch")


@pytest.mark.slow
def test_instance_norm_refuses_a_min_size_that_leaves_a_1x1_map(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    cfg = smoke_cfg(
        compose_train, smoke_data_dir, tmp_path, "model=resnet_small", "model.norm=instance",
        *SHORT, "data.loader.min_size=32",
    )  # fmt: skip
    with pytest.raises(
        TrainingConfigError, match=r"at least 33 px .*InstanceNorm.*data.loader.min_size is 32"
    ):
        train(cfg)


def test_choose_threshold_sits_mid_gap_below_the_kth_defect() -> None:
    scores = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.75])
    defect = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])
    t = choose_threshold(scores, defect, 0.8)  # 4 of 5 defects must be caught: the 4th best scores 0.7
    assert t is not None and t == pytest.approx((0.7 + 0.6) / 2)  # the best good image below 0.7: 0.6
    point = operating_point(scores, defect, t)
    assert point["escape_rate"] == pytest.approx(0.2) and point["false_reject_rate"] == pytest.approx(1 / 3)
    assert operating_point(scores, defect, 0.7)["false_reject_rate"] == point["false_reject_rate"]
    above = float(torch.nextafter(torch.tensor(0.7), torch.tensor(1.0)))
    assert operating_point(scores, defect, above)["escape_rate"] > 0.2  # above the 4th defect: too few
    # the gap below the 5th defect (0.3) reaches down to the good 0.2
    assert choose_threshold(scores, defect, 1.0) == pytest.approx(0.25)
    # no good image below: the k-th defect score itself (99 of 100, not 100)
    many = torch.linspace(0.01, 1.0, 100)
    assert choose_threshold(many, torch.ones(100), 0.99) == pytest.approx(float(many[1]))
    # a defect inside the gap is caught too: recall can only rise
    gap, gap_defect = torch.tensor([0.9, 0.6, 0.1, 0.05]), torch.tensor([1, 1, 0, 0])
    t_gap = choose_threshold(gap, gap_defect, 0.5)  # 1 of 2 must be caught: 0.9 decides, 0.6 is caught too
    assert t_gap == pytest.approx(0.5) and operating_point(gap, gap_defect, t_gap)["escape_rate"] == 0.0
    # a gap of one float32 step has no middle a float32 score can tell apart: the defect's score stays
    good32 = np.float32(0.6)
    tight = np.array([np.nextafter(good32, np.float32(1)), good32], dtype=np.float32)
    assert shared_choose_threshold(tight, np.array([True, False]), 1.0) == float(tight[0])
    assert choose_threshold(scores, torch.zeros(8), 0.9) is None
    with pytest.raises(ValueError, match="target_recall"):
        choose_threshold(scores, defect, 0.0)


def test_a_threshold_set_by_one_defect_image_says_so() -> None:
    """92 defect images (ELPV's validation set): 99 % recall needs all 92, so the lowest-scoring defect
    image alone sets the threshold; 98 % allows one miss."""
    from defectscope.evaluation.threshold import threshold_lines, threshold_report

    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(0.2, 1.0, 92), rng.uniform(0.0, 0.5, 200)])
    defect = np.arange(scores.size) < 92
    strict = threshold_report(scores, defect, 0.99, 1.0)
    assert strict is not None and strict["threshold"] <= scores[:92].min() and strict["recall"] == 1.0
    lines = threshold_lines(strict, "here", "change it")
    assert len(lines) == 2 and "allows no miss" in lines[1] and "92 defect images" in lines[1]
    loose = threshold_report(scores, defect, 0.98, 1.0)
    assert (
        loose is not None and loose["recall"] < 1.0 and len(threshold_lines(loose, "here", "change it")) == 1
    )
    # too costly as well: the WARNING and its table come first (the MLflow tag takes the WARNING), the note last
    costly = threshold_lines(threshold_report(scores, defect, 0.99, 0.0) or {}, "here", "change it")
    assert costly[1].startswith("WARNING: the recall target 99.0 %") and "allows no miss" in costly[-1]


@pytest.mark.slow
def test_threshold_is_chosen_on_validation_and_saved(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """Recompute P(defect) on the whole val split with the saved weights: the stored threshold is the
    one threshold rule's on those scores (reaching threshold.target_recall), and the test used it."""
    from defectscope.checkpoint import load_checkpoint

    cfg = smoke_cfg(
        compose_train,
        smoke_data_dir,
        tmp_path,
        "trainer.max_epochs=2",
        "callbacks.model_checkpoint.save_last=false",
    )
    metrics = train(cfg)
    model, info = load_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    ng = ng_indices(info["class_names"], info["good_class"], info.get("ng_classes"))
    scores, defect = [], []
    with torch.no_grad():  # the one NG rule, as training scores (a sum of NG classes, not 1 - P(good))
        for batch in dm.val_dataloader():
            scores.append(defect_probability(model(batch["image"]).softmax(1), ng))
            defect.append(is_defect_label(batch["label"], ng))
    s, d = torch.cat(scores), torch.cat(defect)
    assert len(s) == len(dm.samples["val"])
    expected = choose_threshold(s, d, float(cfg.threshold.target_recall))
    assert info["threshold"] == pytest.approx(expected, abs=1e-6)
    assert operating_point(s, d, info["threshold"])["escape_rate"] <= 1 - cfg.threshold.target_recall + 1e-9
    assert metrics["test/threshold"] == pytest.approx(info["threshold"], abs=1e-6)


def test_class_weights_and_geometry_errors(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    cfg = smoke_cfg(compose_train, smoke_data_dir, tmp_path, "loss.class_weights=balanced")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = build_module(cfg, dm)
    assert isinstance(module.class_weight, torch.Tensor)
    assert torch.allclose(module.class_weight, dm.class_weights)
    explicit = build_module(
        smoke_cfg(compose_train, smoke_data_dir, tmp_path, "loss.class_weights=[1,2,3,4]"), dm
    )
    assert isinstance(explicit.class_weight, torch.Tensor)
    assert explicit.class_weight.tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(TrainingConfigError, match=r"loss\.class_weights: expected 4 positive numbers"):
        build_module(smoke_cfg(compose_train, smoke_data_dir, tmp_path, "loss.class_weights=[1,2]"), dm)
    # AlexNet's stem needs 63 px; the smoke images are >= 64 px but the loader would accept 32 px
    small = smoke_cfg(compose_train, smoke_data_dir, tmp_path, "model=alexnet", "data.loader.min_size=32")
    dm_small = instantiate(small.data)
    dm_small.setup("fit")
    with pytest.raises(TrainingConfigError, match=r"model\.min_input_size.*data\.loader\.min_size is 32"):
        build_module(small, dm_small)


def test_agc_clips_gradients_before_the_step(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    cfg = smoke_cfg(compose_train, smoke_data_dir, tmp_path, "model=nf_resnet")
    assert cfg.optim.agc_clip == pytest.approx(0.01)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = build_module(cfg, dm)
    net: Any = module.model
    for p in net.parameters():
        p.grad = torch.full_like(p, 1e3)
    head_grad = net.head.weight.grad.clone()
    module.on_before_optimizer_step(torch.optim.SGD(module.parameters(), lr=0.1))
    conv: Any = next(p for n, p in net.named_parameters() if p.ndim == 4)
    ratio = conv.grad.flatten(1).norm(dim=1) / conv.detach().flatten(1).norm(dim=1).clamp(min=1e-3)
    assert float(ratio.max()) <= 0.01 * 1.001  # unit-wise ||G|| / ||W|| <= clip
    assert torch.equal(net.head.weight.grad, head_grad)  # the head is not clipped


@pytest.mark.slow
def test_frozen_backbone_warmup_keeps_pretrained_backbone(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """model=efficientnet_lite0 brings finetune.freeze_epochs=1: after one epoch only the head changed,
    BatchNorm statistics included (bn_eval), and the backbone sits in its own LR group."""
    from defectscope.models import create_model

    cfg = smoke_cfg(compose_train, smoke_data_dir, tmp_path, "model=efficientnet_lite0", *SHORT, "test=false")
    train(cfg)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ref = create_model("efficientnet_lite0", num_classes=4, in_chans=1, weights="package").state_dict()
    backbone = [k for k in ref if not k.startswith("head.")]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(state[f"model.{k}"], ref[k]) for k in backbone)
    assert not torch.equal(state["model.head.weight"], ref["head.weight"])


@pytest.mark.slow
def test_seed_and_deterministic_give_identical_metrics(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    def run(name: str, seed: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        out = tmp_path / name
        cfg = smoke_cfg(compose_train, smoke_data_dir, out, "trainer.deterministic=true", f"seed={seed}")
        metrics = train(cfg)
        metrics.pop("train/images_per_s")
        return metrics, torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    m1, s1 = run("a", 7)
    m2, s2 = run("b", 7)
    assert m1 == m2  # exactly: same machine, same seed
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    m3, _ = run("c", 8)
    assert m3 != m1  # the seed matters (the assert above could fail)


@pytest.mark.slow
def test_evaluate_instantiates_nothing_foreign_from_a_checkpoint(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    from defectscope.plain import PlainDataError
    from defectscope.training.evaluate import evaluate

    train(smoke_cfg(compose_train, smoke_data_dir, tmp_path, *SHORT, "test=false"))
    ckpt = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)

    def evaluate_file(name: str) -> dict[str, float]:
        cfg = compose_train(
            [
                f"ckpt_path={tmp_path / name}",
                f"paths.output_dir={tmp_path / name}-eval",
                f"paths.launch_dir={tmp_path}",
            ],
            config_name="evaluate",
        )
        return evaluate(cfg)

    torch.save(ckpt, tmp_path / "ok.ckpt")
    assert 0.0 <= evaluate_file("ok.ckpt")["test/acc"] <= 1.0
    ckpt["hyper_parameters"]["run_config"]["data"]["eval_transform"] = {
        "_target_": "os.system",
        "command": "true",
    }
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(PlainDataError, match=r"data\.eval_transform\._target_ is 'os\.system'"):
        evaluate_file("evil.ckpt")


class _LayoutProbe(pl.Callback):
    """Records whether every 4-D weight is channels_last at each training step."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        weights = [p for p in pl_module.model.parameters() if p.ndim == 4]
        self.seen.append(all(p.is_contiguous(memory_format=torch.channels_last) for p in weights))


@pytest.mark.slow
def test_channels_last_is_a_layout_only(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """memory_format=channels_last trains in that layout and ends where contiguous training ends."""

    def run(layout: str) -> tuple[list[bool], dict[str, torch.Tensor]]:
        out = tmp_path / layout
        probe = _LayoutProbe()
        extra = ("trainer.deterministic=true", "test=false", f"memory_format={layout}", *SHORT)
        train(smoke_cfg(compose_train, smoke_data_dir, out, "model=resnet_small", *extra), [probe])
        return probe.seen, torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    seen_cl, state_cl = run("channels_last")
    seen_plain, state_plain = run("contiguous")
    assert seen_cl and all(seen_cl) and not any(seen_plain)
    assert state_cl.keys() == state_plain.keys()
    for key, value in state_cl.items():
        torch.testing.assert_close(value, state_plain[key], rtol=1e-3, atol=1e-4, msg=key)
    with pytest.raises(TrainingConfigError, match=r"^memory_format must be one of channels_last, contiguous"):
        train(smoke_cfg(compose_train, smoke_data_dir, tmp_path / "bad", "memory_format=nhwc"))


def test_no_validation_with_a_callback_watching_it_is_one_line_before_training(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """trainer.limit_val_batches=0 with the default callbacks stopped after the first epoch with Lightning's
    traceback (early stopping on val/bal_acc); it is refused before the first step, naming the key to change."""
    extra = ("trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "test=false", *SHORT[:2])
    with pytest.raises(TrainingConfigError) as err:
        train(smoke_cfg(compose_train, smoke_data_dir, tmp_path / "a", *extra))
    assert str(err.value) == (
        "callbacks.model_checkpoint watches val/bal_acc, but trainer.limit_val_batches=0 runs no validation: "
        "set callbacks.model_checkpoint.save_top_k=0 (last.ckpt is still written), or let validation run"
    )
    assert not (tmp_path / "a" / "checkpoints").exists()
    no_best = (*extra, "callbacks.model_checkpoint.save_top_k=0")
    stopper = "callbacks.early_stopping={_target_:pytorch_lightning.callbacks.EarlyStopping,monitor:val/acc}"
    with pytest.raises(
        TrainingConfigError, match=r"^callbacks\.early_stopping watches val/acc, .*early_stopping=null"
    ):
        train(smoke_cfg(compose_train, smoke_data_dir, tmp_path / "b", *no_best, stopper))
    train(
        smoke_cfg(compose_train, smoke_data_dir, tmp_path / "c", *no_best)
    )  # experiment=smoke: no early stopping
    assert (tmp_path / "c" / "checkpoints" / "last.ckpt").is_file()
