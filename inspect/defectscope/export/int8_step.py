"""The int8 step of an export: choose its images before any work, then calibrate, quantise and gate
the verified fp32 graph (the quantiser and the gate are :mod:`.quantize`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import onnx

from defectscope.evaluation.threshold import rests_on_one_image
from defectscope.runtime.image import normalize_batch
from defectscope.runtime.metadata import ModelMetadata

from .errors import ExportError, typed_first_line
from .parity import load_groups, real_batches
from .quantize import (
    AUTO_FP32_STEPS,
    FP32_CONVS_STEP,
    MIN_CHECK_IMAGES,
    Int8Config,
    Int8GateError,
    QuantizationError,
    check_int8,
    cpu_has_vnni,
    early_convs,
    fp32_convs_for,
    quantize_qdq,
    split_paths,
)

T = TypeVar("T")


def _chunks(batches: list[Any], size: int) -> list[Any]:
    return [b[i : i + size] for b in batches for i in range(0, len(b), size)]


@dataclass
class Int8Plan:
    """The images int8 calibrates and gates on, chosen before any export work is done."""

    calib: list[str]
    check: list[str]
    source: str


def plan_int8(
    listed: list[str], images_dir: str | Path | None, cfg: Int8Config, log: Callable[[str], None]
) -> Int8Plan:
    """Split the int8 images (``listed`` by :func:`~.parity.image_paths` from ``images_dir`` or the
    checkpoint's val_paths) up front, so a bad request fails before the export runs."""
    source = f"--images {images_dir}" if images_dir is not None else "the checkpoint's val_paths"
    exists = [os.path.isfile(p) for p in listed]
    present = [p for p, ok in zip(listed, exists) if ok]
    missing = [p for p, ok in zip(listed, exists) if not ok]
    if missing:
        log(
            f"int8: {len(missing)} of {len(listed)} images in {source} do not exist here (first: {missing[0]})"
        )
    try:
        calib, check = split_paths(present, cfg)
    except QuantizationError as exc:
        hint = (
            "add line images to it" if images_dir is not None else "pass --images DIR|LIST with line images"
        )
        raise ExportError(f"{exc} in {source}; {hint}") from None
    return Int8Plan(calib, check, source)


def gate_hints(
    cfg: Int8Config, fp32_earned: dict[str, Any], numbers: dict[str, Any], more_fp32: int | None = None
) -> list[str]:
    """What a failed gate may come from: saturation on a CPU without VNNI; when verdicts disagree, a
    threshold that one validation image sets (each graph's is then set by its own score of that image);
    early convolutions, which see the image in few channels, quantised: ``more_fp32``, a larger
    ``--fp32-convs`` that would keep more of them fp32 (``None`` when none would)."""
    hints = []
    if not cfg.reduce_range and cpu_has_vnni() is False:
        hints.append("this CPU has no VNNI, where 8-bit products can saturate: try --reduce-range")
    source = fp32_earned.get("threshold_source") or {}
    verdicts_differ = bool({"verdict_agreement", "ng_agreement"} & set(numbers.get("failed", ())))
    if verdicts_differ and source.get("method") == "recall target" and rests_on_one_image(source):
        hints.append(
            f"recall {100 * float(source['target_recall']):.1f} % of {source['n_defect']} defect images allows no "
            "miss, so each graph's threshold is set by its lowest-scoring defect image and verdicts near it "
            "flip: a lower --target-recall or more labelled defect images (--images) steady it"
        )
    kept = numbers.get("fp32_convs")
    if more_fp32 is not None and numbers.get("failed"):
        hints.append(
            f"this export kept the first {kept} convolution(s) fp32; more may pass at some cost in speed: try "
            f"--fp32-convs {more_fp32}"
            + (
                ""
                if "fp32_convs_tried" in numbers
                else " (EfficientNet-Lite2 on ELPV needed 5 to 8, by seed)"
            )
        )
    return hints


def _quantize_once(
    fp32_bytes: bytes,
    meta: ModelMetadata,
    cfg: Int8Config,
    batches: tuple[list[Any], list[Any]],
    fp32_threshold: float,
    earn: Callable[[bytes, ModelMetadata], dict[str, Any]],
) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """One calibration, quantisation and gate with ``cfg.fp32_convs`` resolved; raises
    :class:`Int8GateError` when the int8 graph's verdicts (each at its own earned threshold) disagree."""
    calib, check = batches
    int8_bytes = quantize_qdq(
        fp32_bytes, _chunks(calib, 16), cfg, lambda imgs: normalize_batch(imgs, meta.mean, meta.std)
    )
    onnx.checker.check_model(onnx.load_from_string(int8_bytes), full_check=True)
    earned = earn(int8_bytes, replace(meta, int8=True))
    numbers = check_int8(
        fp32_bytes,
        int8_bytes,
        _chunks(check, 16),
        ng_indices=meta.ng_indices,
        thresholds=(fp32_threshold, float(earned["threshold"])),
        min_agreement=cfg.min_agreement,
        grading=meta.grader,
    )
    return int8_bytes, numbers, earned


def fp32_layers(graph: onnx.GraphProto, tried: list[int]) -> dict[str, Any]:
    """The gate's figures on what stayed fp32: the count used, its nodes and, after retries, each count tried."""
    layers: dict[str, Any] = {"fp32_convs": tried[-1], "fp32_conv_nodes": len(early_convs(graph, tried[-1]))}
    if len(tried) > 1:
        layers["fp32_convs_tried"] = list(tried)
    return layers


def _gate_failed(
    exc: Int8GateError, graph: onnx.GraphProto, cfg: Int8Config, fp32_earned: dict[str, Any], tried: list[int]
) -> tuple[int | None, Int8GateError]:
    """After a failed gate: the next ``--fp32-convs`` to try on its own (``None``: stop), and the error
    to raise when stopping, with its figures and hints. Only a default that kept some convolutions fp32
    (a deep network, where a few more are a small share of the compute) is raised on its own."""
    exc.numbers.update(fp32_layers(graph, tried))
    more = tried[-1] + FP32_CONVS_STEP
    deeper = more if len(early_convs(graph, more)) > exc.numbers["fp32_conv_nodes"] else None
    if cfg.fp32_convs is None and tried[0] > 0 and deeper is not None and len(tried) <= AUTO_FP32_STEPS:
        return deeper, exc
    hints = gate_hints(cfg, fp32_earned, exc.numbers, deeper)
    if len(tried) > 1:
        hints.insert(0, f"tried keeping the first {', '.join(map(str, tried))} convolution(s) fp32")
    return None, Int8GateError(f"{exc}; " + "; ".join(hints), exc.numbers) if hints else exc


def try_fp32_counts(
    first: int,
    attempt: Callable[[int], T],
    graph: onnx.GraphProto,
    cfg: Int8Config,
    fp32_earned: dict[str, Any],
    log: Callable[[str], None],
) -> tuple[list[int], T]:
    """``attempt(n)`` with ``first`` early convolutions fp32, then with more while :func:`_gate_failed`
    allows; returns the counts tried (the last is the one that passed) and that attempt's result."""
    tried = [first]
    while True:
        try:
            return tried, attempt(tried[-1])
        except Int8GateError as exc:
            more, error = _gate_failed(exc, graph, cfg, fp32_earned, tried)
            if more is None:
                raise error from None
            log(
                f"int8: the gate failed with the first {tried[-1]} convolution(s) fp32 ({exc}); trying {more}"
            )
            tried = [*tried, more]


def quantize_model(
    fp32_bytes: bytes,
    meta: ModelMetadata,
    cfg: Int8Config,
    plan: Int8Plan,
    log: Callable[[str], None],
    earn: Callable[[bytes, ModelMetadata], dict[str, Any]],
) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """Calibrate, quantise and gate (see :mod:`.quantize`).

    The gate compares the verdicts each graph would ship with, so ``earn`` (the threshold chosen on
    a graph's own validation scores) runs on both. Where ``--fp32-convs`` was not given and the gate
    fails, up to :data:`AUTO_FP32_STEPS` more tries each keep :data:`FP32_CONVS_STEP` more of the early
    convolutions fp32 (Lite models on ELPV needed 2 to 8, by seed); an explicit number is tried alone.
    Returns the int8 bytes, the gate's figures and the int8 graph's earned threshold fields.
    """
    loader = meta.loader
    calib, n_calib, skipped = load_groups(plan.calib, loader, len(plan.calib))
    check, n_check, skipped2 = real_batches(plan.check, loader, meta.mean, meta.std, len(plan.check))
    bad = skipped + skipped2
    if bad:
        log(f"int8: skipped {len(bad)} unreadable image(s) in {plan.source} (first: {bad[0]})")
    if n_calib == 0 or n_check < MIN_CHECK_IMAGES:
        raise ExportError(
            f"int8: {n_calib} readable calibration and {n_check} readable check images in {plan.source}; "
            f"need >= 1 and >= {MIN_CHECK_IMAGES}"
        )
    log(
        f"int8: calibrating ({cfg.method}) on {n_calib} images, gate on {n_check} held-back images from {plan.source}"
    )
    try:
        graph = onnx.load_from_string(fp32_bytes).graph
        fp32_earned = earn(fp32_bytes, meta)
        threshold = float(fp32_earned["threshold"])

        def attempt(kept: int) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
            once = replace(cfg, fp32_convs=kept)  # the number recorded is the number used
            return _quantize_once(fp32_bytes, meta, once, (calib, check), threshold, earn)

        first = fp32_convs_for(graph, cfg.fp32_convs)
        tried, (int8_bytes, numbers, earned) = try_fp32_counts(first, attempt, graph, cfg, fp32_earned, log)
    except Int8GateError:
        raise
    except Exception as exc:  # the quantiser and ORT raise many unrelated types
        raise ExportError(f"int8: quantisation failed: {typed_first_line(exc)}") from exc
    speedup = numbers.get("speedup_vs_fp32_cpu")
    if isinstance(speedup, float) and speedup < 1.0:
        log(
            f"int8: warning: int8 ran {speedup:.2f}x the fp32 speed on this CPU (no VNNI, or a model too small "
            "to gain); measure on the line PC with deploy/bench_inspect.py before deploying it"
        )
    numbers = {
        "format": "QDQ",
        "weights": "int8 per channel" + (" (7-bit, reduce_range)" if cfg.reduce_range else ""),
        "activations": "uint8 per tensor",
        **fp32_layers(graph, tried),
        "calibration": cfg.method,
        "calib_images": n_calib,
        "fp32_threshold": threshold,
        "int8_threshold": float(earned["threshold"]),
        **numbers,
    }
    return int8_bytes, numbers, earned
