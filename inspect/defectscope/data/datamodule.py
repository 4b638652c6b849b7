"""`DefectDataModule`: source -> splits -> scan -> bucketed, augmented, normalised batches.

Built by ``hydra.utils.instantiate(cfg.data)``.  ``setup`` does all checking up front (every
file decoded once, all bad files reported together) and fills the attributes training, export
and evaluation read: ``class_names``, ``good_class``, ``channels``, ``mean``, ``std``,
``loader_config``, ``class_counts``, ``class_weights``, ``val_paths``.

DDP: the dataloaders read ``trainer.global_rank`` / ``trainer.world_size`` when they are built
and give each rank its share through :class:`BucketBatchSampler`, so the Trainer must run with
``use_distributed_sampler=False``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ..plain import to_plain
from ..runtime.outputs import OutputError
from .dataset import DefectDataset, collate, seed_worker
from .errors import DataConfigError
from .multiscale import draw_scale, rescale_batch
from .records import SPLITS, Sample, SourceData
from .sampler import BucketBatchSampler
from .scan import (
    BadFilesError,
    ScanRecord,
    ScanResult,
    check_rejects_not_scanned,
    mean_std,
    scan_files,
    write_rejects,
)
from .settings import check_normalisation_length, data_settings
from .sources import SourceError, build_source, prepare_source
from .splits import assign_splits, spread_samples
from .stats import class_counts, count_table, inverse_frequency_weights, split_warnings
from .transforms import build_transform, check_size_preserving, seed_transform

log = logging.getLogger(__name__)


#: validation images recorded in checkpoints for export's parity and int8 calibration/gate
MAX_EXPORT_VAL_PATHS = 4096


class DefectDataModule(pl.LightningDataModule):
    """Data for one training run; see ``conf/data/*.yaml`` for every option.

    The keywords are checked by :func:`.settings.data_settings` (torch-free, so ``train`` can run the
    same checks before it imports Lightning).

    Args:
        source: ``{"kind": folder|csv|elpv|synthetic, ...}`` (see :mod:`defectscope.data.sources`).
        loader: :class:`LoaderConfig` fields (channels, max_side, min_size, size_multiple, max_pixels, downscale,
            upscale_to).
        split: ``val_fraction`` (of the non-test part), ``test_fraction`` (of all), ``seed``; used
            only where the source has no split.  Unset keys take the source's defaults
            (ELPV: 25 % test, seed 42), then 0.15 / 0.15 / 42.
        batch_size / eval_batch_size: images per bucket batch for training / val+test.
        train_transform: albumentations pipeline (``_target_`` mapping or object).
        eval_transform: must be ``None``. The line PC runs no transform, and validation chooses the
            threshold, so a transform there would earn the threshold on images the line never
            sees; the keyword stays only so older run configs (``eval_transform: null``) load.
        mean / std: per-channel, on the 0..1 scale; ``None`` = exact values of the training split
            (computed during the scan at no extra decoding cost).
        on_bad_file: ``fail`` (default: one error listing every bad file) or ``skip`` (train on the
            rest and write ``rejects_path`` as CSV path,kind,reason).
        evaluate_on: None for training; ``test`` (the test split) or ``all`` (every image, e.g. a
            new lot) for evaluation, which needs no training images and takes ``mean``/``std`` as given.
        seed: shuffling and augmentation seed (the split has its own ``split.seed``).
        pin_memory: ``None`` = only when CUDA is available.
        ordered: the classes, in class order, are grades from best to worst (the good class first);
            training then uses an ordinal objective (``ordinal.*``).
        dihedral: train on random 90° rotations, transposes and flips (:mod:`.dihedral`), each
            batch keeping one size.
        multi_scale: scale factors; each training batch is resized by one drawn per batch
            (:mod:`.multiscale`).  ``None`` = off.
    """

    def __init__(self, source: Mapping[str, Any], **options: Any) -> None:
        super().__init__()
        settings = data_settings(source, **options)  # the keywords and their checks, torch-free
        self.evaluate_on = settings.evaluate_on
        self.source_spec = settings.source
        self.loader_config = settings.loader
        self.split_cfg = settings.split
        self.batch_size, self.eval_batch_size = settings.batch_size, settings.eval_batch_size
        self.num_workers = settings.num_workers
        pin = settings.pin_memory
        self.pin_memory = (
            torch.cuda.is_available() if pin is None else bool(pin and torch.cuda.is_available())
        )
        self.persistent_workers = settings.persistent_workers
        # built now, from the allow-list: a wrong argument is told before any data is generated or scanned
        spec = settings.train_transform
        spec = to_plain(spec) if isinstance(spec, Mapping) else spec  # a config, or a transform built in code
        self.train_transform = build_transform(spec, "data.train_transform")
        self.mean_cfg, self.std_cfg = settings.mean, settings.std
        self.on_bad_file, self.rejects_path = settings.on_bad_file, settings.rejects_path
        self.scan_workers, self.seed = settings.scan_workers, settings.seed
        self.drop_last, self.ordered = settings.drop_last, settings.ordered
        self.dihedral, self.multi_scale = settings.dihedral, settings.multi_scale

        # Filled by setup():
        self.channels: int = self.loader_config.channels
        self.class_names: list[str] = []
        self.good_class: str = ""
        self.mean: list[float] = []
        self.std: list[float] = []
        self.class_counts: dict[str, int] = {}
        self.class_weights: torch.Tensor = torch.empty(0)
        self.val_paths: list[str] = []
        #: class name of each of ``val_paths`` (export re-derives the threshold on them)
        self.val_labels: list[str] = []
        #: what the split cannot measure (classes missing from validation/test); also in ``report``
        self.split_warnings: list[str] = []
        self.samples: dict[str, list[Sample]] = {}
        self.sizes: dict[str, list[tuple[int, int]]] = {}
        self.scan_result: ScanResult | None = None
        self.rejected: list[str] = []
        self.report: str = ""
        self.datasets: dict[str, DefectDataset] = {}
        #: set by the caller (training.train.ready_datamodule): checks the class settings against the listed
        #: classes, called with (class_names, good_class, ordered) before the scan decodes every image
        self.class_check: Callable[[list[str], str, bool], None] | None = None
        self._ready = False

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Generate the synthetic set if needed (runs once per node, before ``setup`` on all ranks)."""
        prepare_source(self.source_spec)

    def setup(self, stage: str | None = None) -> None:
        """List, split and scan once; later calls (fit, then test) reuse the result."""
        if self._ready:
            return
        # missing CSV rows go through the scan too, so `fail` reports them with every other bad file
        source = build_source(self.source_spec, missing="keep")
        if source.good_class is None:
            raise SourceError("data.source.good_class must name the defect-free class")
        self.class_names = list(source.class_names)
        self.good_class = source.good_class
        if self.evaluate_on is None and len(self.class_names) < 2:
            raise SourceError(
                f"{source.description}: only one class ({', '.join(self.class_names)}); training needs at least 2 "
                "classes, e.g. <root>/good/ and <root>/<defect>/ with images in each"
            )
        if self.evaluate_on is None and self.class_check is not None:
            self.class_check(self.class_names, self.good_class, bool(self.ordered))
        samples = self._split(source)
        records = self._scan(samples, source.origin)
        kept = [(s, r) for s, r in zip(samples, records) if r is not None]
        self.samples = {name: [s for s, _ in kept if s.split == name] for name in SPLITS}
        self.sizes = {name: [r.size for s, r in kept if s.split == name] for name in SPLITS}
        if self.evaluate_on is None:
            self._check_training_split(source, kept)
        elif self.mean_cfg is None or self.std_cfg is None:
            raise ValueError("evaluation needs data.mean and data.std (the checkpoint's normalisation)")
        else:
            self.mean, self.std = self._normalisation([])
        self._build_datasets(any(s.meta for s in samples))
        self.report = self._make_report(source, [s for s, _ in kept])
        log.info("%s", self.report)
        for line in self.split_warnings:
            log.warning("data: %s", line)
        self._ready = True

    def _check_training_split(self, source: SourceData, kept: Sequence[tuple[Sample, ScanRecord]]) -> None:
        """Every class in training; class weights, normalisation and the val paths export records."""
        train = self.samples["train"]
        self.class_counts = class_counts(train, self.class_names)
        empty = [c for c, n in self.class_counts.items() if n == 0]
        if empty:
            raise SourceError(
                f"{source.description}: no training images for class(es) {empty}; every class in "
                f"{self.class_names} needs training images (check data.source.classes and data.split: "
                f"{self.split_cfg or 'defaults'})"
            )
        self.class_weights = torch.tensor(inverse_frequency_weights(self.class_counts), dtype=torch.float32)
        self.mean, self.std = self._normalisation([r for s, r in kept if s.split == "train"])
        val = spread_samples(self.samples["val"], MAX_EXPORT_VAL_PATHS)
        self.val_paths = [s.path for s in val]
        self.val_labels = [self.class_names[s.label] for s in val]
        self.split_warnings = split_warnings([s for s, _ in kept], self.class_names, self.good_class)

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._loader("train", self.batch_size, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._loader("val", self.eval_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._loader("test", self.eval_batch_size, shuffle=False, drop_last=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches only: resized by this batch's multi-scale factor (validation never is)."""
        trainer = self.trainer
        if not self.multi_scale or trainer is None or not trainer.training or trainer.sanity_checking:
            return batch
        first = int(batch["index"][0])
        factor = draw_scale(self.multi_scale, self.seed, trainer.current_epoch, first)
        return rescale_batch(batch, factor, self.loader_config.size_multiple)

    # ------------------------------------------------------------------ steps

    def _split(self, source: SourceData) -> list[Sample]:
        if self.evaluate_on == "all":
            for s in source.samples:
                s.split = "test"
            return source.samples
        defaults = {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 42, **source.split_defaults}
        cfg = {**defaults, **{k: v for k, v in self.split_cfg.items() if v is not None}}
        samples = source.samples
        names = self.class_names
        splits = assign_splits(
            [s.split for s in samples],
            [s.stratum or names[s.label] for s in samples],
            [s.path for s in samples],
            val_fraction=float(cfg["val_fraction"]),
            test_fraction=float(cfg["test_fraction"]),
            seed=int(cfg["seed"]),
        )
        for s, sp in zip(samples, splits):
            s.split = sp
        return samples

    @property
    def _uses(self) -> str:
        return "train on" if self.evaluate_on is None else "score"

    def _scan(self, samples: list[Sample], origin: Mapping[str, str]) -> list[ScanRecord | None]:
        if self.on_bad_file == "skip" and self.rejects_path:
            try:
                check_rejects_not_scanned(self.rejects_path, [s.path for s in samples], "data.rejects_path")
            except OutputError as exc:
                raise DataConfigError(str(exc)) from None
        result = scan_files([s.path for s in samples], self.loader_config, self.scan_workers)
        self.scan_result = result
        log.info("scanned %d images in %.1f s (%d bad)", len(samples), result.seconds, len(result.bad))
        if result.bad:
            if self.on_bad_file == "fail":
                usable = len(result.bad) < len(samples)
                hint = f"set data.on_bad_file=skip to {self._uses} the rest" if usable else "none can be used"
                raise BadFilesError(result.bad, len(samples), hint, origin)
            if self.rejects_path:
                out = write_rejects(self.rejects_path, result.bad)
                log.warning("skipping %d bad image(s); list written to %s", len(result.bad), out)
            self.rejected = [b.path for b in result.bad]
        return result.records

    def _normalisation(self, train_records: Sequence[ScanRecord | None]) -> tuple[list[float], list[float]]:
        c = self.channels
        mean, std = self.mean_cfg, self.std_cfg
        if mean is None or std is None:
            est_mean, est_std = mean_std(train_records, c)
            mean = est_mean if mean is None else mean
            std = est_std if std is None else std
        check_normalisation_length(mean, std, c)
        if any(s <= 0 for s in std):
            raise ValueError(f"data.std values must be > 0, got {std}")
        return (mean * c if len(mean) == 1 else list(mean)), (std * c if len(std) == 1 else list(std))

    def _build_datasets(self, with_meta: bool) -> None:
        train_tf = self.train_transform
        check_size_preserving(train_tf, self.sizes["train"], self.channels, "train_transform")
        seed_transform(train_tf, self.seed)
        for name in SPLITS:
            self.datasets[name] = DefectDataset(
                self.samples[name],
                self.sizes[name],
                self.loader_config,
                self.mean,
                self.std,
                train_tf if name == "train" else None,
                with_meta,
            )

    def _make_report(self, source: SourceData, kept: list[Sample]) -> str:
        buckets = Counter(r for sizes in self.sizes.values() for r in sizes)
        lines = [
            f"data: {source.description}",
            count_table(kept, self.class_names),
            *(
                [
                    "class weights (train, inverse frequency): "
                    + ", ".join(f"{c}={w:.3f}" for c, w in zip(self.class_names, self.class_weights.tolist()))
                ]
                if self.evaluate_on is None
                else [f"evaluation: {'every image' if self.evaluate_on == 'all' else 'the test split'}"]
            ),
            f"good class: {self.good_class}; channels: {self.channels}; mean {self.mean}; std {self.std}",
            f"{len(buckets)} size buckets (h x w) for {sum(buckets.values())} images",
        ]
        lines += [f"WARNING: {w}" for w in self.split_warnings]
        if self.rejected:
            lines.append(f"skipped {len(self.rejected)} bad file(s) (see {self.rejects_path})")
        if source.ignored:
            lines.append(
                f"ignored {len(source.ignored)} file(s) (not an image, or outside the class folders), e.g. {source.ignored[0]}"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ loaders

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def dataset(self, split: str) -> DefectDataset:
        if not self._ready:
            raise RuntimeError("call setup() before asking for datasets or dataloaders")
        return self.datasets[split]

    def require_splits(self, *splits: str) -> None:
        """Refuse an empty split a run will need, before it trains (a missing test split was found after)."""
        for split in splits:
            if not self.dataset(split).samples:
                where = f"data.split.{split}_fraction (> 0), a {split}/ folder beside train/ or {split} rows in a CSV"
                skip = ", or run with test=false" if split == "test" and self.evaluate_on is None else ""
                raise SourceError(f"the {split} split is empty; set {where}{skip}")

    def _loader(
        self, split: str, batch_size: int, *, shuffle: bool, drop_last: bool
    ) -> DataLoader[dict[str, Any]]:
        ds = self.dataset(split)
        self.require_splits(split)
        rank, world = self._rank_world()
        ds.rank = rank
        sampler = BucketBatchSampler(
            ds.sizes,
            batch_size,
            shuffle=shuffle,
            seed=self.seed,
            drop_last=drop_last,
            num_replicas=world,
            rank=rank,
            dihedral=self.dihedral and split == "train",
        )
        return DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=seed_worker if self.num_workers > 0 else None,
        )

    def export_info(self) -> dict[str, Any]:
        """Plain values export and checkpoints embed (everything here round-trips through JSON)."""
        return {
            "class_names": list(self.class_names),
            "good_class": self.good_class,
            "loader": self.loader_config.to_dict(),
            "mean": list(self.mean),
            "std": list(self.std),
            "val_paths": list(self.val_paths),
            "val_labels": list(self.val_labels),
        }
