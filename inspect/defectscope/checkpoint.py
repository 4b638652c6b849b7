"""The one reader of training checkpoints: every command that opens a ``.ckpt`` goes through here.

A checkpoint is data, never a program (docs/trust.md).  It is loaded with ``weights_only=True``,
so no pickled object is ever rebuilt; its ``defectscope`` entry is then checked field by field
(types, sizes, no Hydra keys), and the network is rebuilt from the registry name and plain kwargs
it records, its ``model.*`` weights loaded strictly.  Nothing read from the file is imported by
name or handed to ``hydra.utils.instantiate``: data configs go through
:mod:`defectscope.data.rebuild`, transforms through an exact allow-list.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models.corn import LINKS
from .plain import PlainDataError, check_plain, expect, number, string_list
from .runtime.decision import DEFAULT_TARGET_RECALL, RECALL_EXPECTED, THRESHOLD_RANGE, is_recall_target
from .runtime.files import checkpoint_file_problem, os_error_reason
from .runtime.grading import GRADING_KEYS, Grading, GradingError
from .runtime.metadata import (
    MAX_CLASSES,
    MAX_NAME_CHARS,
    NORMALISATION_RANGE,
    MetadataError,
    class_list_problem,
    parse_loader,
)

INFO_KEY = "defectscope"
STATE_PREFIX = "model."
SUPPORTED_FORMAT_VERSIONS = (1,)
REQUIRED_INFO_KEYS = (
    "format_version",
    "model_name",
    "model_kwargs",
    "class_names",
    "good_class",
    "threshold",
    "loader",
    "mean",
    "std",
)
_RUN_ID = re.compile(r"^[0-9A-Za-z_\-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """The file is missing, unreadable, not a defectscope checkpoint, or does not fit its model."""


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that name the file and what was expected."""
    p = Path(path)
    try:  # missing, a folder, an ONNX model, an image, an empty file, text: said as such before torch.load
        problem = checkpoint_file_problem(p)
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot be read ({os_error_reason(exc)})") from None
    if problem:
        raise CheckpointError(problem)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message goes on to suggest weights_only=False, which is what this refusal is for
        found = re.search(r"Unsupported global: GLOBAL \S+|Unsupported operand \d+", str(exc))
        raise CheckpointError(
            f"{p}: refuses to load with weights_only=True (it contains pickled objects; defectscope "
            f"checkpoints hold plain data only{': ' + found.group(0) if found else ''})"
        ) from None
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{p}: not a readable PyTorch checkpoint ({type(exc).__name__}: {first})"
        ) from None
    if not isinstance(ckpt, dict) or INFO_KEY not in ckpt:
        raise CheckpointError(
            f"{p}: not a defectscope checkpoint (no {INFO_KEY!r} entry; expected a checkpoint written "
            "by `defectscope train`)"
        )
    return ckpt


def read_info(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`read_checkpoint` + :func:`validate_info`: ``(checkpoint, checked defectscope entry)``."""
    ckpt = read_checkpoint(path)
    return ckpt, validate_info(ckpt[INFO_KEY], str(path))


def validate_info(info: Any, source: str) -> dict[str, Any]:
    """Check the ``defectscope`` entry: every key export relies on, each of the expected type and size."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{source}: {INFO_KEY!r} entry is a {type(info).__name__}, expected a dict")
    missing = [k for k in REQUIRED_INFO_KEYS if k not in info]
    if missing:
        raise CheckpointError(f"{source}: {INFO_KEY!r} entry lacks key(s): {', '.join(missing)}")
    version = info["format_version"]
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        raise CheckpointError(
            f"{source}: checkpoint format_version {version!r} is not supported "
            f"(this version reads {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))})"
        )
    try:
        check_plain(info, f"{source}: {INFO_KEY}")
        _check_fields(info, f"{source}: {INFO_KEY}")
    except PlainDataError as exc:
        raise CheckpointError(str(exc)) from None
    return info


def _check_fields(info: dict[str, Any], where: str) -> None:
    expect(info["model_name"], str, f"{where}.model_name", "a model name")
    expect(info["model_kwargs"], dict, f"{where}.model_kwargs", "a dict of plain arguments")
    names = string_list(info["class_names"], f"{where}.class_names", MAX_CLASSES, MAX_NAME_CHARS)
    problem = class_list_problem(names)  # the rule the data source and the model file hold them to
    if problem:
        raise PlainDataError(f"{where}.class_names: {problem}")
    if expect(info["good_class"], str, f"{where}.good_class", "a class name") not in names:
        raise PlainDataError(f"{where}.good_class: {info['good_class']!r} is not one of {names}")
    number(info["threshold"], f"{where}.threshold", *THRESHOLD_RANGE)
    channels = _check_loader(info["loader"], f"{where}.loader")
    for key in ("mean", "std"):
        values = expect(info[key], list, f"{where}.{key}", "a list of numbers")
        if len(values) not in (1, channels):
            raise PlainDataError(f"{where}.{key}: {len(values)} values, expected 1 or {channels} (channels)")
        for i, v in enumerate(values):
            number(v, f"{where}.{key}[{i}]", *NORMALISATION_RANGE[key])
    _check_optional(info, where, names)
    recorded_grading(info.get("grading"), len(names), f"{where}.grading")  # the link and the grading rule


def recorded_grading(entry: Any, n_classes: int, where: str = "grading") -> tuple[str, Grading | None]:
    """A checkpoint's ``grading`` entry -> the objective's link and, for ordered grades, the grading rule
    (None: unordered classes, graded by argmax). The reader checks a file with it, export rebuilds the
    head and chooses cut points from it, evaluate builds its module and a loaded module takes its cut points
    from it; a missing entry (older checkpoints) is softmax, argmax."""
    if entry is None:
        return "softmax", None
    expect(entry, dict, where, "an object")
    link = entry.get("link", "softmax")
    if link not in LINKS:
        raise PlainDataError(f"{where}.link is {link!r:.60}; this defectscope knows {', '.join(LINKS)}")
    ordered = entry.get("ordered", False)
    if not isinstance(ordered, bool):  # the word "no" must not read as true
        raise PlainDataError(f"{where}.ordered must be true or false, got {ordered!r:.60}")
    try:
        grading = Grading.from_doc({k: entry[k] for k in GRADING_KEYS if k in entry}, n_classes, where)
    except GradingError as exc:
        raise PlainDataError(str(exc)) from None
    if ordered:
        return str(link), grading
    if grading.rule != "argmax":  # cut points, if any, were refused above: argmax has none
        raise PlainDataError(
            f"{where}.rule is {grading.rule!r}; unordered classes (ordered: false) take argmax"
        )
    return str(link), None


def _check_loader(loader: Any, where: str) -> int:
    """The loader settings, by the same rule as a model's metadata (:func:`parse_loader`)."""
    try:
        return parse_loader(loader).channels
    except MetadataError as exc:
        raise PlainDataError(f"{where}: {exc}") from None


def _check_optional(info: dict[str, Any], where: str, names: list[str]) -> None:
    paths = string_list(info.get("val_paths") or [], f"{where}.val_paths")
    labels = info.get("val_labels")
    if labels is not None:
        labels = string_list(labels, f"{where}.val_labels")
        if len(labels) != len(paths) or not set(labels) <= set(names):
            raise PlainDataError(
                f"{where}.val_labels: expected one class name of {names} per val_paths entry "
                f"({len(paths)}), got {len(labels)} labels"
            )
    ng = string_list(info.get("ng_classes") or [], f"{where}.ng_classes", MAX_CLASSES, MAX_NAME_CHARS)
    if not set(ng) <= set(names) - {info["good_class"]}:
        raise PlainDataError(f"{where}.ng_classes: {ng!r} must be classes of {names} other than the good one")
    run_id = info.get("mlflow_run_id")
    if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
        raise PlainDataError(
            f"{where}.mlflow_run_id: expected an MLflow run id (letters, digits), got {run_id!r}"
        )
    sha = info.get("teacher_sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        raise PlainDataError(f"{where}.teacher_sha256: expected 64 hex digits (a file's sha256), got {sha!r}")
    for key in ("mlflow_tracking_uri", "package_version"):
        if info.get(key) is not None:
            expect(info[key], str, f"{where}.{key}", "a string")
    if info.get("target_recall") is not None:
        recall_target(info["target_recall"], f"{where}.target_recall")
    if info.get("warn_false_reject_rate") is not None:
        number(info["warn_false_reject_rate"], f"{where}.warn_false_reject_rate", 0.0, 1.0)


def recall_target(value: Any, where: str) -> float:
    """A recorded recall target, by the rule training set it by (:func:`is_recall_target`)."""
    try:
        checked = number(value, where, 0.0, 1.0)  # a type, overflow and NaN check
    except PlainDataError:
        checked = math.nan
    if not is_recall_target(checked):
        raise PlainDataError(f"{where}: expected {RECALL_EXPECTED}, got {repr(value)[:80]}")
    return checked


def target_recall(ckpt: Mapping[str, Any], info: Mapping[str, Any], source: str) -> float:
    """The recall target training chose the threshold for (older checkpoints: their hyper-parameters)."""
    if info.get("target_recall") is not None:
        return float(info["target_recall"])
    hparams = ckpt.get("hyper_parameters")
    spec = hparams.get("threshold") if isinstance(hparams, Mapping) else None
    value = spec.get("target_recall") if isinstance(spec, Mapping) else None
    if value is None:
        return DEFAULT_TARGET_RECALL
    try:
        return recall_target(value, f"{source}: hyper_parameters.threshold.target_recall")
    except PlainDataError as exc:
        raise CheckpointError(str(exc)) from None


def recorded_run_config(ckpt: Mapping[str, Any]) -> Mapping[str, Any]:
    """The composed config training recorded (``hyper_parameters.run_config``); empty when it recorded none.
    Its values are data: each reader checks the keys it uses."""
    hparams = ckpt.get("hyper_parameters")
    run = hparams.get("run_config") if isinstance(hparams, Mapping) else None
    return run if isinstance(run, Mapping) else {}


def run_data_config(ckpt: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """The data config recorded at training time (checked later by :mod:`defectscope.data.rebuild`)."""
    data = recorded_run_config(ckpt).get("data")
    if not isinstance(data, Mapping) or not data:
        raise CheckpointError(
            f"{source} records no data config; choose one: data=folder data.source.root=..."
        )
    return data


def model_state(ckpt: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The network's weights: ``state_dict`` entries under ``model.``, prefix stripped."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: has no 'state_dict' (expected a Lightning checkpoint)")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: 'state_dict' holds non-tensor entries, e.g. {bad[0]!r}")
    own = {k[len(STATE_PREFIX) :]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
    if not own:
        raise CheckpointError(f"{source}: 'state_dict' has no {STATE_PREFIX}* keys (the network's weights)")
    return own


def model_spec(info: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Registry name and kwargs to rebuild the network; pretrained ``weights`` are never fetched again
    (the checkpoint carries the weights, and a file must not choose a download).  The name must be
    registered: it is looked up, never imported."""
    from defectscope.models import list_models

    if info["model_name"] not in list_models():
        raise CheckpointError(
            f"unknown model {info['model_name']!r} (this defectscope knows: {', '.join(list_models())})"
        )
    kwargs = dict(info["model_kwargs"])
    if "weights" in kwargs:
        kwargs["weights"] = None
    return str(info["model_name"]), kwargs


def build_model(info: dict[str, Any], source: str) -> nn.Module:
    """``create_model(model_name, **model_kwargs)``; unknown names list the valid ones."""
    from defectscope.models import create_model

    try:
        name, kwargs = model_spec(info)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    try:
        model: nn.Module = create_model(name, **kwargs)
    except Exception as exc:
        raise CheckpointError(
            f"{source}: cannot build model {name!r} from model_kwargs {info['model_kwargs']!r}: {exc}"
        ) from exc
    return model


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained network in eval mode; returns ``(model, checkpoint["defectscope"])``, the
    entry checked, with ``target_recall`` filled in from older checkpoints' hyper-parameters."""
    source = str(path)
    ckpt, info = read_info(path)
    info["target_recall"] = target_recall(ckpt, info, source)
    model = build_model(info, source)
    try:
        model.load_state_dict(model_state(ckpt, source), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{source}: weights do not fit model {info['model_name']!r}: {mismatch(exc)}"
        ) from None
    broken = [
        k
        for k, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if (
        broken
    ):  # training stops before it saves such weights; found here, not as a parity failure after export
        raise CheckpointError(f"{source}: weights are not finite (NaN or inf) in {', '.join(broken[:3])}")
    return model.eval(), info


def mismatch(exc: RuntimeError) -> str:
    """torch's load_state_dict error (every key, over many lines) as counts and first examples."""
    text = str(exc)
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: ([^\n]*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: ([^\n]*)")):  # fmt: skip
        found = re.search(pattern, text)
        keys = re.findall(r'"([^"]+)"', found.group(1)) if found else []
        if keys:
            parts.append(f"{len(keys)} {label} key(s) (first: {keys[0]})")
    sizes = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape (.+?) from checkpoint, "
        r"the shape in current model is (.+?)\.(?:\n|$)",
        text,
    )
    if sizes:
        name, got, want = sizes[0]
        parts.append(
            f"{len(sizes)} shape mismatch(es) (first: {name}, {got} in the file, {want} in the model)"
        )
    return "; ".join(parts) or " ".join(text.split())[:300]
