"""LightningModule around a pure defectscope network (``self.model``), plus the OK/NG threshold.

Everything a checkpoint needs to be rebuilt is passed to ``__init__`` as plain data and saved as
hyper-parameters, so checkpoints load with ``torch.load(weights_only=True)`` (contract #3) and
``DefectClassifier(**checkpoint["hyper_parameters"])`` could rebuild the module; evaluate builds it from the
checked ``defectscope`` entry alone (:func:`defectscope.training.evaluate.evaluation_module`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..checkpoint import recorded_grading
from ..evaluation.threshold import DEFAULT_WARN_FALSE_REJECT_RATE, threshold_report
from ..models.corn import raw_outputs, with_link
from ..runtime.decision import (
    defect_probability,
    is_defect_label,
    ng_indices,
)
from ..runtime.grading import Grading, choose_cuts, expected_grade, grade_indices, ordinal_metrics
from .classes import configured_ng_classes
from .config import (
    TrainingConfigError,
    check_class_names,
    loss_settings,
    lr_plan,
    optimizer_lr,
    sam_rho,
    threshold_settings,
)
from .distill import distill_loss
from .entry import checkpoint_entry
from .metrics import (
    DefectScores,
    class_metrics,
    confusion_matrix,
    defect_auroc,
    metric_key,
    operating_point,
)
from .objectives import ObjectiveError
from .optimization import (
    build_optimizer,
    build_scheduler,
    check_resumed_horizon,
    check_resumed_optimizer,
    scheduler_interval,
)
from .ordinal import ProbsAndLabels, ng_cross_entropy, resolve_objective
from .sam import SharpnessAware
from .shift import ShiftScores


class DefectClassifier(pl.LightningModule):
    """Training of a GAP classifier (:mod:`.ordinal` objectives), val/test metrics, a recall-targeted threshold."""

    teacher_probs: torch.Tensor | None
    ng_mask: torch.Tensor  # (K,) bool: the NG classes (threshold.ng_classes)

    def __init__(
        self,
        *,
        model: Mapping[str, Any],
        num_classes: int,
        in_chans: int,
        class_names: list[str],
        good_class: str,
        optim: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        finetune: Mapping[str, Any] | None = None,
        threshold: Mapping[str, Any] | None = None,
        data_info: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
        ordinal: Mapping[str, Any] | None = None,
        ordered: bool = False,
    ) -> None:
        super().__init__()
        # logger=False: the tracker logs the whole resolved config itself, flattened.
        self.save_hyperparameters(logger=False)
        from defectscope.models import create_model

        self.class_names = list(class_names)
        check_class_names(self.class_names, num_classes, good_class, ordered)
        optimizer_lr(dict(dict(optim).get("optimizer") or {}), finetune)  # checks finetune.* too
        self.sam_rho = sam_rho(optim)
        #: the SAM wrapper once the optimizer is built (None: plain steps)
        self._sam: SharpnessAware | None = None
        self._mix: tuple[float, torch.Tensor] = (1.0, torch.zeros(0, dtype=torch.long))  # mixup's last draw
        #: the scheduler states of the checkpoint being resumed (checked against the new schedule)
        self._resumed_schedules: Any = None
        self._resumed_optimizers: Any = None
        scheduler_interval(scheduler)
        loss = dict(loss or {})
        self.loss_settings = loss_settings(loss)
        try:
            self.objective = resolve_objective(ordinal, bool(ordered), self.loss_settings.label_smoothing)
        except ObjectiveError as exc:
            raise TrainingConfigError(str(exc)) from None
        #: the grading rule; the cut points of ``cuts`` are chosen on validation each epoch
        cuts = tuple(k + 0.5 for k in range(num_classes - 1)) if self.objective.rule == "cuts" else ()
        self.grading = Grading(self.objective.rule, cuts, self.objective.cuts_for)
        spec = dict(model)
        name = spec.pop("name")
        outputs = raw_outputs(num_classes, self.objective.link)
        self.model = create_model(name, num_classes=outputs, in_chans=in_chans, **spec)
        self.model_name = str(name)
        self.good_class = good_class
        self._set_decision(dict(threshold or {}), ordered)
        weights = loss.get("class_weights")
        self.register_buffer(
            "class_weight",
            None if weights is None else torch.tensor(weights, dtype=torch.float32),
            persistent=False,
        )
        self.data_info = dict(data_info or {})
        #: how many misclassified test images (with CAM) to keep for the artifact grid
        self.misclassified_max = 16
        self.test_outputs: dict[str, Any] = {}
        self._misclassified: list[dict[str, Any]] = []
        #: shift-consistency protocol of the test stage (training.config.shift_protocol); None = off
        self.shift_protocol: Any = None
        #: distillation (training.distill): the teacher's probabilities per training image, or None
        # a plain CPU tensor, not a buffer: DDP would broadcast a buffer from rank 0 at every step
        self.teacher_probs = None
        self.distill_weight, self.distill_temperature = 0.0, 1.0
        #: the teacher file's sha256, kept in the checkpoint so a resumed run can tell the file was replaced
        self.teacher_sha256: str | None = None
        self._add_metrics(num_classes)

    def _set_decision(self, thr: dict[str, Any], ordered: bool) -> None:
        """``threshold.*``: which classes are NG, the recall target and the starting threshold
        (after ``class_names`` and ``good_class`` are set)."""
        self.ng_classes = configured_ng_classes(self.class_names, self.good_class, thr, bool(ordered))
        self.ng_indices = ng_indices(self.class_names, self.good_class, self.ng_classes)
        mask = torch.tensor([i in self.ng_indices for i in range(len(self.class_names))])
        self.register_buffer("ng_mask", mask, persistent=False)  # moves with the module, for the NG loss
        self.target_recall, self.warn_false_reject_rate, self.threshold = threshold_settings(
            thr, DEFAULT_WARN_FALSE_REJECT_RATE
        )
        #: what the last validation's threshold costs (evaluation.threshold.threshold_report), or None
        self.threshold_report: dict[str, Any] | None = None

    def set_teacher(self, probs: Any, weight: float, temperature: float, sha256: str) -> None:
        """Train on ``weight`` of the teacher's soft targets (rows indexed like the training split)."""
        self.teacher_probs = torch.as_tensor(probs, dtype=torch.float32)
        self.distill_weight, self.distill_temperature = float(weight), float(temperature)
        self.teacher_sha256 = sha256

    def _add_metrics(self, num_classes: int) -> None:
        """The running metrics of each stage (module attributes, so Lightning moves and resets them)."""
        self.train_loss = MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_metrics, self.test_metrics = class_metrics(num_classes), class_metrics(num_classes)
        self.val_confmat, self.test_confmat = confusion_matrix(num_classes), confusion_matrix(num_classes)
        self.val_scores, self.test_scores = DefectScores(), DefectScores()
        self.val_probs, self.test_probs = ProbsAndLabels(), ProbsAndLabels()
        self.test_shift = ShiftScores()

    # ------------------------------------------------------------------ forward / loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw network outputs (K logits; K - 1 for CORN): see :meth:`class_model` for K classes."""
        return self.model(x)

    def class_model(self) -> torch.nn.Module:
        """The network as a K-class model (log-probabilities, K heat maps), as export builds it."""
        return with_link(self.model, self.objective.link)

    def criterion(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The objective's loss, plus ``loss.ng_weight`` times the OK/NG decision's (:func:`ng_cross_entropy`)."""
        weight = self.class_weight if isinstance(self.class_weight, torch.Tensor) else None
        loss = self.objective.loss(raw, target, weight)
        if self.loss_settings.ng_weight == 0:
            return loss
        ng = ng_cross_entropy(self.objective.log_probs(raw), target, self.ng_mask, weight)
        return loss + self.loss_settings.ng_weight * ng

    def defect_probability(self, raw: torch.Tensor) -> torch.Tensor:
        """P(defect) under the project-wide rule (:mod:`defectscope.runtime.decision`)."""
        return defect_probability(self.objective.probs(raw), self.ng_indices)

    def grade(self, probs: torch.Tensor) -> torch.Tensor:
        """The class each image is given: argmax, or the grade under the grading rule."""
        graded = grade_indices(probs.detach().double().cpu().numpy(), self.grading)
        return torch.from_numpy(graded).to(probs.device)

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        soft = None
        if self.teacher_probs is not None:
            soft = self.teacher_probs[batch["index"].cpu()].to(x.device)
        mixup = self.loss_settings.mixup
        if mixup > 0:  # mixup: a convex mix of two images trains on the same mix of their losses
            if self._sam is None or not self._sam.perturbed:  # SAM's second pass: the same mix
                lam = float(torch.distributions.Beta(mixup, mixup).sample())
                self._mix = (lam, torch.randperm(x.shape[0], device=x.device))
            lam, order = self._mix
            raw = self.model(lam * x + (1 - lam) * x[order])
            loss = lam * self.criterion(raw, y) + (1 - lam) * self.criterion(raw, y[order])
            soft = None if soft is None else lam * soft + (1 - lam) * soft[order]
        else:
            raw = self.model(x)
            loss = self.criterion(raw, y)
        if soft is not None:
            kd = distill_loss(self.objective.log_probs(raw), soft, self.distill_temperature)
            loss = (1 - self.distill_weight) * loss + self.distill_weight * kd
        if self._sam is not None and self._sam.perturbed:
            return loss  # SAM's second pass: the metrics are those of the real weights
        n = int(y.numel())
        self.train_loss.update(loss.detach(), weight=n)
        self.train_acc.update(self.objective.probs(raw.detach()).argmax(dim=1), y)
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def _eval_step(self, batch: Mapping[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss now; everything that depends on the grade is counted at the epoch's end."""
        x, y = batch["image"], batch["label"]
        raw = self.model(x)
        getattr(self, f"{stage}_loss").update(self.criterion(raw, y), weight=int(y.numel()))
        probs = self.objective.probs(raw)
        self._outputs(stage).update(probs, y)
        return raw, self.grade(probs)

    def _outputs(self, stage: str) -> ProbsAndLabels:
        return self.val_probs if stage == "val" else self.test_probs

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        logits, preds = self._eval_step(batch, "test")
        if self.shift_protocol is not None:
            self.test_shift.update_batch(
                self.class_model(), batch["image"], self.ng_indices, self.shift_protocol
            )
        if len(self._misclassified) < self.misclassified_max:
            self._keep_misclassified(batch, logits, preds)

    @torch.no_grad()
    def _keep_misclassified(
        self, batch: Mapping[str, Any], logits: torch.Tensor, preds: torch.Tensor
    ) -> None:
        wrong = (preds != batch["label"]).nonzero().flatten().tolist()
        for i in wrong[: self.misclassified_max - len(self._misclassified)]:
            x = batch["image"][i : i + 1]
            class_model: Any = self.class_model()
            cam = class_model.cam(x)[0, int(preds[i])]
            self._misclassified.append({
                "image": x[0].float().cpu(), "cam": cam.float().cpu(), "label": int(batch["label"][i]),
                "pred": int(preds[i]), "p_defect": float(self.defect_probability(logits[i : i + 1])[0]),
                "path": str(batch["path"][i]) if "path" in batch else "",
            })  # fmt: skip

    # ------------------------------------------------------------------ epoch ends

    def _count(self, stage: str, choose_cuts_now: bool) -> None:
        """Grade the epoch's images (choosing the cut points first on validation) and count them."""
        outputs = self._outputs(stage)
        if choose_cuts_now and self.grading.rule == "cuts":
            every_probs, every_label = outputs.gathered()  # the same cuts on every rank
            if every_label.numel() > 0:
                expected, truth = expected_grade(every_probs.double().cpu().numpy()), every_label.reshape(-1)
                cuts_for = self.objective.cuts_for
                cuts = choose_cuts(expected, truth.cpu().numpy(), len(self.class_names), cuts_for)
                self.grading = Grading("cuts", cuts, cuts_for)
        probs, labels = outputs.compute()
        labels = labels.reshape(-1)  # torchmetrics squeezes a one-element result to 0-d (one val image)
        if labels.numel() == 0:
            return
        preds = self.grade(probs)
        getattr(self, f"{stage}_metrics").update(preds, labels)
        getattr(self, f"{stage}_confmat").update(preds, labels)
        getattr(self, f"{stage}_scores").update(
            defect_probability(probs, self.ng_indices), is_defect_label(labels, self.ng_indices)
        )

    def _epoch_metrics(self, stage: str) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute (synchronised across ranks) and reset this stage's metrics."""
        self._count(stage, choose_cuts_now=stage == "val" and not self.trainer.sanity_checking)
        out = {"loss": float(getattr(self, f"{stage}_loss").compute())}
        for name, value in getattr(self, f"{stage}_metrics").compute().items():
            if value.ndim == 0:
                out[name] = float(value)
            else:
                for cls, v in zip(self.class_names, value.tolist()):
                    out[f"{name}/{metric_key(cls)}"] = float(v)
        confmat = getattr(self, f"{stage}_confmat").compute().cpu()
        scores, targets = (t.cpu().reshape(-1) for t in getattr(self, f"{stage}_scores").compute())
        auroc = defect_auroc(scores, targets)
        if auroc is not None:
            out["auroc"] = auroc
        if self.objective.ordered and int(confmat.sum()) > 0:
            out.update(ordinal_metrics(confmat.numpy()))
        for metric in ("loss", "metrics", "confmat", "scores"):
            getattr(self, f"{stage}_{metric}").reset()
        self._outputs(stage).reset()
        return out, confmat, scores, targets

    def on_validation_epoch_end(self) -> None:
        values, _, scores, targets = self._epoch_metrics("val")
        if not self.trainer.sanity_checking:
            report = threshold_report(
                scores.numpy(), targets.numpy(), self.target_recall, self.warn_false_reject_rate
            )
            if report is not None:
                self.threshold, self.threshold_report = float(report["threshold"]), report
        values["threshold"] = self.threshold
        values.update(operating_point(scores, targets, self.threshold))
        self.log_dict({f"val/{k}": v for k, v in values.items()}, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self._misclassified = []

    def on_test_epoch_end(self) -> None:
        values, confmat, scores, targets = self._epoch_metrics("test")
        values["threshold"] = self.threshold
        values.update(operating_point(scores, targets, self.threshold))
        values.update(self.test_shift.figures(self.threshold))
        self.test_shift.reset()
        self.log_dict({f"test/{k}": v for k, v in values.items()}, sync_dist=True)
        self.test_outputs = {
            "metrics": values,
            "confmat": confmat.numpy(),
            "scores": scores.numpy(),
            "is_defect": targets.numpy(),
            "threshold": self.threshold,
            "class_names": self.class_names,
            "misclassified": self._misclassified,
        }

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        scale, decay = lr_plan(self.hparams.get("finetune"))
        optimizer = build_optimizer(dict(self.hparams["optim"])["optimizer"], self.model, scale, decay)
        if self.sam_rho > 0:
            optimizer = self._sam = SharpnessAware(optimizer, self.sam_rho, self.model)
        check_resumed_optimizer(self._resumed_optimizers, optimizer, self.trainer.ckpt_path)
        self._resumed_optimizers = None  # checked: not kept for the whole run
        sched_cfg = dict(self.hparams.get("scheduler") or {})
        if "_target_" not in sched_cfg:
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler, interval = build_scheduler(sched_cfg, optimizer, steps, int(self.trainer.max_epochs or 1))
        check_resumed_horizon(self._resumed_schedules, scheduler, self.trainer.ckpt_path)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        clip = dict(self.hparams["optim"]).get("agc_clip")
        if clip:
            from defectscope.models.agc import adaptive_grad_clip, agc_parameters

            adaptive_grad_clip(agc_parameters(self.model), float(clip))

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_info(self) -> dict[str, Any]:
        """``checkpoint["defectscope"]`` exactly as contract #3 defines it (plain data)."""
        return checkpoint_entry(self)

    def grading_info(self) -> dict[str, Any]:
        """Plain data: the objective, its link (export rebuilds it) and the grading rule with its cuts."""
        return {**self.objective.to_info(), **self.grading.to_doc()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["defectscope"] = self.checkpoint_info()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_schedules = checkpoint.get("lr_schedulers")
        self._resumed_optimizers = checkpoint.get("optimizer_states")
        info = checkpoint.get("defectscope") or {}
        if "threshold" in info:
            self.threshold = float(info["threshold"])
        _, recorded = recorded_grading(info.get("grading"), len(self.class_names), "checkpoint grading")
        if recorded is not None and recorded.rule == self.grading.rule:
            self.grading = recorded
