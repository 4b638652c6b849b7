"""DefectDataModule from the real Hydra configs: contract attributes, batches, bad files, Trainer/DDP."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from defectscope.data import DefectDataModule
from defectscope.data.scan import SHOWN_BAD_FILES, BadFilesError
from defectscope.runtime.image import LoaderConfig
from test_data_scan import make_bad_dataset

CONF = Path(__file__).resolve().parents[1] / "conf"


def data_cfg(name: str, tmp_path: Path, *overrides: str) -> DictConfig:
    """Compose conf/data/<name>.yaml as training does, with the paths/seed groups training provides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            overrides=[
                f"+data={name}",
                f"+paths.data_dir={tmp_path / 'data'}",
                f"+paths.output_dir={tmp_path / 'out'}",
                "+seed=7",
                "data.num_workers=0",
                *overrides,
            ]
        )
    return cfg


def ready(cfg: DictConfig) -> DefectDataModule:
    dm = instantiate(cfg.data)
    assert isinstance(dm, DefectDataModule)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def check_contract(dm: DefectDataModule) -> None:
    assert dm.good_class in dm.class_names
    assert isinstance(dm.loader_config, LoaderConfig) and dm.channels == dm.loader_config.channels
    assert len(dm.mean) == len(dm.std) == dm.channels and all(s > 0 for s in dm.std)
    assert list(dm.class_counts) == dm.class_names and all(n > 0 for n in dm.class_counts.values())
    assert dm.class_weights.dtype == torch.float32 and dm.class_weights.shape == (len(dm.class_names),)
    assert dm.val_paths and all(isinstance(p, str) for p in dm.val_paths)
    json.dumps(dm.export_info())  # plain values only


def check_batch(batch: dict[str, Any], channels: int) -> None:
    img = batch["image"]
    assert img.dtype == torch.float32 and img.ndim == 4 and img.shape[1] == channels
    n = img.shape[0]
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (n,)
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (n,)
    assert len(batch["path"]) == n and all(isinstance(p, str) for p in batch["path"])


def test_synthetic_config_end_to_end(tmp_path: Path) -> None:
    dm = ready(data_cfg("synthetic", tmp_path, "data.source.n=48", "data.batch_size=8"))
    check_contract(dm)
    assert dm.class_names == ["good", "scratch", "spot", "crack"] and dm.good_class == "good"
    assert (tmp_path / "data" / "synthetic" / "manifest.csv").exists()
    assert sum(len(v) for v in dm.samples.values()) == 48
    assert isinstance(dm.datasets["train"].transform, A.Compose)
    seen: list[int] = []
    sizes = set()
    for batch in dm.train_dataloader():
        check_batch(batch, 1)
        assert batch["image"].shape[0] <= 8
        h, w = batch["image"].shape[2:]
        assert h % 32 == 0 and w % 32 == 0  # size_multiple 32 in the smoke config
        sizes.add((h, w))
        seen += batch["index"].tolist()
        for i, p in zip(batch["index"].tolist(), batch["path"]):
            assert dm.datasets["train"].samples[i].path == p
    assert sorted(seen) == list(range(len(dm.datasets["train"])))
    assert len(sizes) > 1  # several buckets, never squashed into one size
    val = next(iter(dm.val_dataloader()))
    check_batch(val, 1)
    assert "meta" not in val
    # normalised with the training statistics: whole-train-set pixels have mean ~0, std ~1
    pixels = torch.cat([b["image"].flatten() for b in dm.train_dataloader()])
    assert abs(pixels.mean().item()) < 0.35 and 0.6 < pixels.std().item() < 1.6


def test_eval_batches_are_not_augmented_and_match_runtime(tmp_path: Path) -> None:
    from defectscope.runtime.image import load_image, normalize_batch

    dm = ready(data_cfg("synthetic", tmp_path, "data.source.n=24", "data.mean=[0.5]", "data.std=[0.25]"))
    assert dm.mean == [0.5] and dm.std == [0.25]
    batch = next(iter(dm.val_dataloader()))
    expected = normalize_batch([load_image(p, dm.loader_config) for p in batch["path"]], dm.mean, dm.std)
    np.testing.assert_array_equal(batch["image"].numpy(), expected)


def test_worker_processes_cover_the_epoch_and_keep_eval_identical(tmp_path: Path) -> None:
    cfg = data_cfg("synthetic", tmp_path, "data.source.n=40", "data.batch_size=4")
    serial = ready(cfg)
    cfg.data.num_workers = 2
    cfg.data.persistent_workers = False
    parallel = ready(cfg)
    seen = [i for b in parallel.train_dataloader() for i in b["index"].tolist()]
    assert sorted(seen) == list(range(len(parallel.datasets["train"])))
    for a, b in zip(serial.val_dataloader(), parallel.val_dataloader()):
        assert a["path"] == b["path"] and torch.equal(a["image"], b["image"])


def test_rgb_synthetic(tmp_path: Path) -> None:
    dm = ready(data_cfg("synthetic", tmp_path, "data.source.n=24", "data.loader.channels=3"))
    assert dm.channels == 3 and len(dm.mean) == 3
    check_batch(next(iter(dm.train_dataloader())), 3)


def _folder_dataset(root: Path, n: int = 10) -> None:
    rng = np.random.default_rng(0)
    for cls in ("good", "dent"):
        for i in range(n):
            (root / cls).mkdir(parents=True, exist_ok=True)
            w = 64 + 32 * (i % 2)
            Image.fromarray(rng.integers(0, 256, (64, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")


def test_folder_config(tmp_path: Path) -> None:
    _folder_dataset(tmp_path / "data" / "images")
    dm = ready(data_cfg("folder", tmp_path, "data.split.test_fraction=0.2", "data.split.val_fraction=0.25"))
    check_contract(dm)
    assert dm.class_names == ["dent", "good"]
    assert {k: len(v) for k, v in dm.samples.items()} == {"train": 12, "val": 4, "test": 4}
    check_batch(next(iter(dm.test_dataloader())), 1)


def test_csv_config_with_bad_files_fail_then_skip(tmp_path: Path) -> None:
    manifest, bad = make_bad_dataset(tmp_path / "data")
    with pytest.raises(BadFilesError) as info:
        ready(data_cfg("csv", tmp_path, "data.loader.size_multiple=16", "data.split.val_fraction=0.3"))
    msg = str(info.value)
    assert {b.path for b in info.value.bad} == {str(tmp_path / "data" / p) for p in bad}
    assert f"{len(bad)} of " in msg and "data.on_bad_file=skip" in msg
    shown = [b for b in info.value.bad if b.path in msg]
    assert len(shown) == min(len(bad), SHOWN_BAD_FILES)
    assert all(f"{b.path}: [{b.kind}] {b.reason} (listed in {manifest} row " in msg for b in shown)

    dm = ready(
        data_cfg(
            "csv", tmp_path, "data.loader.size_multiple=16", "data.on_bad_file=skip",
            "data.split.val_fraction=0.3", "data.split.test_fraction=0.0",
        )
    )  # fmt: skip
    assert sum(len(v) for v in dm.samples.values()) == 5
    rows = list(
        csv.DictReader(io.StringIO(Path(tmp_path / "out" / "rejects.csv").read_text(encoding="utf-8")))
    )
    assert sorted(r["kind"] for r in rows) == sorted(bad.values())
    assert "skipped 7 bad file(s)" in dm.report
    check_batch(next(iter(dm.train_dataloader())), 1)


def test_size_changing_transform_is_refused_at_setup(tmp_path: Path) -> None:
    cfg = data_cfg(
        "synthetic", tmp_path, "data.source.n=16",
        "data.train_transform.transforms=[{_target_: albumentations.RandomRotate90, p: 1.0}]",
    )  # fmt: skip
    with pytest.raises(ValueError, match="RandomRotate90/Transpose only for square images"):
        ready(cfg)


def test_bad_config_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.on_bad_file"):
        DefectDataModule({"kind": "folder", "root": str(tmp_path)}, on_bad_file="ignore")
    with pytest.raises(ValueError, match=r"data\.split: unknown key"):
        DefectDataModule({"kind": "folder", "root": str(tmp_path)}, split={"val": 0.1})
    with pytest.raises(ValueError, match=r"^evaluate_on must be one of test, all or null, got 'train'$"):
        DefectDataModule({"kind": "folder", "root": str(tmp_path)}, evaluate_on="train")
    # sizes the loader would produce outside [min_size, max_side] (issue 21): refused before training
    with pytest.raises(ValueError, match=r"^data\.loader\.size_multiple \(128\) must be <= max_side"):
        DefectDataModule(
            {"kind": "folder", "root": str(tmp_path)}, loader={"max_side": 100, "size_multiple": 128}
        )
    _folder_dataset(tmp_path / "imgs", 3)
    with pytest.raises(
        ValueError, match=r"data\.mean has 2 values; expected 1 or 1"
    ):  # before any file is read
        DefectDataModule({"kind": "folder", "root": str(tmp_path / "imgs")}, mean=[0.5, 0.5], std=[0.2])


@pytest.mark.slow
def test_elpv_config(tmp_path: Path) -> None:
    dm = ready(data_cfg("elpv", tmp_path, "data.batch_size=64"))
    check_contract(dm)
    assert dm.class_names == ["functional", "defective"] and dm.good_class == "functional"
    n = {k: len(v) for k, v in dm.samples.items()}
    assert n["test"] == 656 and n["train"] + n["val"] == 1968 and n["val"] == 295
    batch = next(iter(dm.val_dataloader()))
    check_batch(batch, 1)
    assert batch["image"].shape[2:] == (300, 300)
    assert {m["module_type"] for m in batch["meta"]} <= {"mono", "poly"}
    types = {s.meta["module_type"] for s in dm.samples["test"]}
    assert types == {"mono", "poly"}


# --------------------------------------------------------------------------- with a real Trainer


class IndexRecorder(pl.LightningModule):
    """Smallest model that trains on bucket batches and records which samples each rank saw."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 4)
        self.out_dir = out_dir
        self.seen: dict[str, list[int]] = {"train": [], "val": []}

    def _step(self, batch: dict[str, Any], split: str) -> torch.Tensor:
        self.seen[split] += batch["index"].tolist()
        logits = self.head(self.conv(batch["image"]).mean((2, 3)))
        return torch.nn.functional.cross_entropy(logits, batch["label"])

    def training_step(self, batch: dict[str, Any], _: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], _: int) -> None:
        self._step(batch, "val")

    def on_train_epoch_end(self) -> None:
        path = Path(self.out_dir) / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.seen))
        self.seen = {"train": [], "val": []}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(dm: DefectDataModule, out: Path, devices: int, strategy: str | None = None) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        num_sanity_val_steps=0, strategy=strategy or "auto",
    )  # fmt: skip
    trainer.fit(IndexRecorder(str(out)), datamodule=dm)


def _seen(out: Path, ranks: int, epoch: int, split: str) -> Sequence[list[int]]:
    return [json.loads((out / f"rank{r}_epoch{epoch}.json").read_text())[split] for r in range(ranks)]


@pytest.mark.slow
def test_trainer_single_process_sees_each_sample_once_per_epoch(tmp_path: Path) -> None:
    dm = instantiate(data_cfg("synthetic", tmp_path, "data.source.n=40", "data.batch_size=4").data)
    _fit(dm, tmp_path, 1)
    n_train = len(dm.datasets["train"])
    (e0,), (e1,) = _seen(tmp_path, 1, 0, "train"), _seen(tmp_path, 1, 1, "train")
    assert sorted(e0) == sorted(e1) == list(range(n_train))
    assert e0 != e1  # set_epoch reached the sampler: a new shuffle each epoch


@pytest.mark.slow
def test_trainer_ddp_two_ranks_share_the_epoch(tmp_path: Path) -> None:
    cfg = data_cfg("synthetic", tmp_path, "data.source.n=42", "data.batch_size=4")
    dm = instantiate(cfg.data)
    dm.prepare_data()  # generate once, before the worker processes start
    _fit(dm, tmp_path, 2, "ddp_spawn")
    probe = ready(cfg)  # same config, same split, in this process
    for epoch in (0, 1):
        train = _seen(tmp_path, 2, epoch, "train")
        assert len(train[0]) and len(train[1])
        assert not set(train[0]) & set(train[1])
        assert sorted(train[0] + train[1]) == list(range(len(probe.datasets["train"])))
        val = _seen(tmp_path, 2, epoch, "val")
        assert sorted(val[0] + val[1]) == list(range(len(probe.datasets["val"])))
