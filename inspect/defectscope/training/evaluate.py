"""``evaluate(cfg)``: a checkpoint's figures on its own test split, or on every image of a new lot.

The checkpoint is read by the one reader (:mod:`defectscope.checkpoint`) and everything it names is
rebuilt from registries: the network from its model name and plain kwargs, the data from a source
kind and plain arguments (:mod:`defectscope.data.rebuild`), transforms from an exact allow-list.
All of that is checked before Lightning starts, so a hostile file is refused before anything runs.
The figures come from :mod:`defectscope.evaluation`, exactly as for an exported model.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..checkpoint import (
    CheckpointError,
    mismatch,
    model_spec,
    model_state,
    read_info,
    recorded_grading,
    recorded_run_config,
    run_data_config,
    target_recall,
)
from ..data.rebuild import datamodule_kwargs
from ..data.sources import SOURCES
from ..evaluation.report import evaluation_doc, flat_metrics, report_lines
from ..plain import to_plain
from .config import (
    TrainingConfigError,
    memory_format,
    model_layout,
    scalar_metrics,
    stop_cause,
    torch_threads,
    use_memory_format,
)
from .preflight import check_evaluate_config

#: figures the test stage logs that the shared report does not compute: the loss and, for ordered
#: grades, the ordinal figures (``runtime.grading.ordinal_metrics``); shift consistency is added by prefix
LOGGED_KEPT = ("test/loss", "test/mae", "test/off_by_more_than_one", "test/qwk")


def evaluation_data(
    cfg: DictConfig, ckpt: dict[str, Any], info: dict[str, Any], source: str, out_dir: Path
) -> tuple[dict[str, Any], str, bool]:
    """Checked DataModule kwargs, what is scored (``all`` or ``test``), and whether the data came
    from the command line (then it may be generated, and its class order is the model's)."""
    given = bool(cfg.get("data"))
    spec = to_plain(cfg.data) if given else run_data_config(ckpt, source)
    where = "data" if given else f"{source}: hyper_parameters.run_config.data"
    kwargs = datamodule_kwargs(spec, where, from_file=not given)
    scope = cfg.get("evaluate_on") or ("all" if given else "test")  # checked by check_evaluate_config
    src = dict(kwargs["source"])
    if (
        given
        and src.get("classes") is None
        and "classes" in inspect.signature(SOURCES[src["kind"]]).parameters
    ):
        src["classes"] = list(info["class_names"])  # label order = the model's; a lot may lack classes
        src["classes_key"] = "the checkpoint's classes"  # its messages then say to rename, not to add
    kwargs.update(
        source=src,
        loader=info["loader"],
        mean=info["mean"],
        std=info["std"],
        rejects_path=str(out_dir / "rejects.csv"),
        evaluate_on=scope,
    )
    return kwargs, scope, given


def evaluation_module(ckpt: dict[str, Any], info: dict[str, Any], source: str, threshold: float) -> Any:
    """The LightningModule for testing, built from checked values only (no hyper-parameters from the file)."""
    from .module import DefectClassifier

    try:
        name, kwargs = model_spec(info)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    channels = int(info["loader"].get("channels", 1))
    in_chans = int(kwargs.pop("in_chans", channels))
    kwargs.pop("num_classes", None)
    try:
        _, grading = recorded_grading(info.get("grading"), len(info["class_names"]), "grading")
        named = (info.get("grading") or {}).get("objective")  # looked up in the objective registry
        objective = {"rule": grading.rule, "cuts_for": grading.cuts_for} if grading is not None else {}
        if isinstance(named, str):
            objective["objective"] = named
        module = DefectClassifier(
            model={"name": name, **kwargs},
            num_classes=len(info["class_names"]),
            in_chans=in_chans,
            class_names=list(info["class_names"]),
            good_class=str(info["good_class"]),
            optim={},
            threshold={
                "target_recall": target_recall(ckpt, info, source),
                "default": threshold,
                "ng_classes": info.get("ng_classes"),
            },
            data_info={"loader": info["loader"], "mean": info["mean"], "std": info["std"]},
            ordinal=objective,  # unknown objective names are refused by the registry
            ordered=grading is not None,
        )
        module.model.load_state_dict(model_state(ckpt, source), strict=True)
        module.on_load_checkpoint({"defectscope": info})  # the grading rule's cut points, checked by Grading
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not fit model {name!r}: {mismatch(exc)}") from None
    except ValueError as exc:  # the objective registry or the grading rule refused the recorded entry
        raise CheckpointError(f"{source}: {exc}") from None
    module.threshold = threshold
    return module


def evaluation_layout(given: Any, ckpt: Mapping[str, Any], source: str) -> tuple[str, str]:
    """``memory_format`` (checked by the caller) or, when null, the layout the checkpoint was trained in
    (its run config; contiguous if it records none), and why. A layout changes no figure; channels_last
    is what makes EfficientNet-Lite fast on the CPU."""
    if given is not None:
        return str(given), "memory_format"
    recorded = recorded_run_config(ckpt).get("memory_format")
    if recorded is None:
        return "contiguous", "the default; the checkpoint records no layout"
    try:
        memory_format(recorded)
    except TrainingConfigError as exc:
        raise CheckpointError(
            f"{source}: hyper_parameters.run_config.{str(exc)[:200]}; set memory_format= to evaluate it anyway"
        ) from None
    return str(recorded), "as trained"


def scope_text(scope: str, given: bool, dm: Any) -> str:
    description = str(dm.report.splitlines()[0]).removeprefix("data: ") if dm.report else "?"
    if scope == "all":
        return f"every image of {description}"
    return f"the test split of {description}" + ("" if given else " (the checkpoint's training data)")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test metrics (and plots) of a checkpoint on its own test split or on ``data=...``."""
    with torch_threads(cfg.get("threads")):
        return evaluate_checkpoint(cfg)


def _scored_datamodule(
    data_kwargs: dict[str, Any], given: bool, ckpt_file: str, class_names: list[str]
) -> Any:
    """What is scored (the test split, or every image of a new lot), from the user's ``data`` config
    (``given``) or the checkpoint's recorded one."""
    from ..data.datamodule import DefectDataModule

    try:
        dm = DefectDataModule(**data_kwargs)
    except ValueError as exc:  # the user's data.* names its key; the checkpoint's needs the file named too
        raise exc if given else TrainingConfigError(f"{ckpt_file}: the recorded data config: {exc}") from None
    if given:
        dm.prepare_data()
    dm.setup("test")
    if list(dm.class_names) != class_names:
        raise TrainingConfigError(
            f"data: classes {dm.class_names} differ from the checkpoint's {class_names} "
            "(names and order must match; set data.source.classes)"
        )
    return dm


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """Test metrics, the shared evaluation report and plots of ``cfg.ckpt_path``."""
    t0 = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    by_hand, ckpt_file = check_evaluate_config(cfg)
    ckpt, info = read_info(ckpt_file)
    layout, layout_from = evaluation_layout(cfg.get("memory_format"), ckpt, ckpt_file)
    data_kwargs, scope, given = evaluation_data(cfg, ckpt, info, ckpt_file, out_dir)
    threshold = float(by_hand) if by_hand is not None else float(info["threshold"])
    # Lightning and torchmetrics only once the file and the data config passed their checks: a refusal
    # then costs torch's import alone (about 6 s less on 2 cores)
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from .artifacts import summary_lines, write_test_plots
    from .config import shift_protocol
    from .targets import check_component_targets
    from .trainer_check import check_trainer

    check_component_targets(cfg, ("trainer",))
    check_trainer(cfg.get("trainer"))
    module = evaluation_module(ckpt, info, ckpt_file, threshold)
    use_memory_format(module.model, layout)
    layout = model_layout(module.model) or layout  # what the weights are now, where a kernel tells
    module.shift_protocol = shift_protocol(cfg.get("shift_consistency"), module.model.total_stride)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    dm = _scored_datamodule(data_kwargs, given, ckpt_file, list(info["class_names"]))
    try:
        results = trainer.test(module, datamodule=dm, verbose=False)
    except SystemExit:  # Lightning ends an interrupted test with sys.exit (code 0 after a SIGTERM)
        if not trainer.interrupted:
            raise
        print(
            f"defectscope evaluate: stopped by {stop_cause(trainer)}; nothing was written",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(130) from None
    logged = scalar_metrics(results[0] if results else {})
    kept = {k: v for k, v in logged.items() if k in LOGGED_KEPT or k.startswith("test/shift/")}
    out = module.test_outputs
    doc = evaluation_doc(out["confmat"], out["class_names"], out["scores"], out["is_defect"], threshold)
    metrics = {**kept, **flat_metrics(doc)}
    if not trainer.is_global_zero:
        return metrics
    where = scope_text(scope, given, dm)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_test_plots(out, dm, out_dir / "plots")
    metrics_file = Path(str(cfg.get("metrics_file") or out_dir / "metrics.json"))
    metrics_file.write_text(
        json.dumps(
            {"checkpoint": ckpt_file, "scored": where, "metrics": metrics, "evaluation": doc, "plots": plots},
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    lines = summary_lines(
        "evaluate",
        seconds=time.perf_counter() - t0,
        metrics={k: v for k, v in kept.items() if k != "test/loss"},
        checkpoint=ckpt_file,
    )
    lines += report_lines(doc, where)
    lines += [
        f"memory format:   {layout} ({layout_from})",
        f"metrics file:    {metrics_file}",
        f"plots:           {out_dir / 'plots'}",
    ]
    print("\n".join(lines), flush=True)
    return metrics
