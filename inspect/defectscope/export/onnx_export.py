"""Checkpoint -> BN-folded, parity-gated, self-describing ONNX file.

Order matters: everything that can fail (config checks, fusion, export, ONNX checker, the parity
gate) happens in memory before a single byte is written, and the file is then written atomically.
A failed export therefore leaves the output path exactly as it was.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from defectscope import __version__
from defectscope.models.corn import raw_outputs, with_link
from defectscope.models.tta import FlipTTA
from defectscope.runtime.files import file_kind
from defectscope.runtime.image import LoaderConfig
from defectscope.runtime.metadata import MetadataError, ModelMetadata
from defectscope.runtime.outputs import OutputError, check_name, check_output_file

from .atomic import atomic_write_bytes
from .errors import ExportError, typed_first_line
from .fuse import FuseReport, fuse_conv_bn_report, replace_bn_with_affine
from .grading import GradingExportError, check_cut_images, checkpoint_grading, earn_cuts
from .graph import check_graph, set_metadata, to_onnx, with_metadata
from .int8_step import Int8Plan, plan_int8, quantize_model
from .opset import MIN_OPSET, opset_problem
from .parity import (
    ParityInputs,
    check_parity,
    image_paths,
    load_groups,
    random_batches,
    random_sizes,
    real_batches,
)
from .quantize import Int8Config
from .threshold import ThresholdPlan, earn_threshold, plan_threshold
from .wrapper import ExportWrapper, head_linear


@dataclass
class ExportResult:
    path: Path
    size_bytes: int
    seconds: dict[str, float]
    parity: dict[str, Any]
    metadata: ModelMetadata
    fuse_report: FuseReport
    model_bytes: bytes = field(repr=False, default=b"")


def loader_config(info: dict[str, Any]) -> LoaderConfig:
    try:
        return LoaderConfig(**info["loader"])
    except (TypeError, ValueError) as exc:
        raise ExportError(
            f"checkpoint 'loader' entry {info.get('loader')!r} is not a LoaderConfig: {exc}"
        ) from None


def build_metadata(
    info: dict[str, Any],
    model: nn.Module,
    *,
    cam: bool,
    fp16: bool,
    threshold: float | None = None,
    checkpoint_sha256: str | None = None,
    parity: dict[str, Any] | None = None,
    tta: str = "none",
    cuts_for: str | None = None,
) -> ModelMetadata:
    """The runner's view of the model, from the checkpoint info and the model's attributes."""
    cfg = loader_config(info)
    try:
        _, grading = checkpoint_grading(info, cuts_for)
        return ModelMetadata(
            class_names=list(info["class_names"]),
            good_class=str(info["good_class"]),
            threshold=float(info["threshold"] if threshold is None else threshold),
            loader=cfg,
            mean=[float(v) for v in info["mean"]],
            std=[float(v) for v in info["std"]],
            model_name=str(info["model_name"]),
            ng_classes=[str(c) for c in info.get("ng_classes") or []],
            package_version=__version__,
            total_stride=int(getattr(model, "total_stride", 1)),
            outputs=["logits", "probs", "cam"] if cam else ["logits", "probs"],
            fp16=fp16,
            tta=tta,
            grading=grading,
            mlflow_run_id=info.get("mlflow_run_id"),
            checkpoint_sha256=checkpoint_sha256,
            parity=dict(parity or {}),
        )
    except (MetadataError, GradingExportError) as exc:
        raise ExportError(str(exc)) from None


def parity_inputs(
    info: dict[str, Any],
    channels: int,
    min_side: int,
    *,
    parity_images: int,
    paths: list[str],
) -> ParityInputs:
    """Random batches (3 sizes x batch 1/4) plus up to ``parity_images`` real images of ``paths``."""
    inputs = ParityInputs(batches=random_batches(channels, min_side))
    inputs.random_shapes = [[n, channels, h, w] for h, w in random_sizes(min_side) for n in (1, 4)]
    if parity_images > 0:
        cfg = loader_config(info)
        batches, used, skipped = real_batches(paths, cfg, info["mean"], info["std"], parity_images)
        inputs.batches += batches
        inputs.real_images, inputs.real_skipped = used, skipped
    return inputs


def _check_images_readable(info: dict[str, Any], images_dir: str | Path, paths: list[str]) -> None:
    """A ``--images`` none of whose ``paths`` the runtime's loader can read is refused before the
    work (found at the parity step before, after the graph was exported, or with
    ``--parity-images 0`` only later); reading stops at the first image that loads."""
    _, used, skipped = load_groups(paths, loader_config(info), limit=1)
    if used == 0:
        raise ExportError(f"--images {images_dir}: none of its images could be read (first: {skipped[0]})")


def _plans(
    info: dict[str, Any],
    images_dir: str | Path | None,
    int8: Int8Config | None,
    *,
    target_recall: float | None,
    by_hand: float | None,
    grading: dict[str, Any],
    log: Callable[[str], None],
) -> tuple[list[str], tuple[Int8Config, Int8Plan] | None, ThresholdPlan]:
    """The gates' images and what int8 and the threshold will do with them, all checked before the
    work.  Parity and int8 share one listing; the threshold reads a labelled ``--images`` itself
    (for its labels)."""
    listed = image_paths(info, images_dir)  # a --images that lists nothing is refused here
    if images_dir is not None:
        _check_images_readable(info, images_dir, listed)
    int8_plan = (int8, plan_int8(listed, images_dir, int8, log)) if int8 is not None else None
    threshold_plan = plan_threshold(info, images_dir, target_recall=target_recall, by_hand=by_hand, log=log)
    check_cut_images(grading, info, threshold_plan.images)
    return listed, int8_plan, threshold_plan


def _kind(path: Path) -> str | None:
    """:func:`file_kind` of an existing file; None for none or one that cannot be read (check_output_file then
    says why)."""
    try:
        return file_kind(path) if path.is_file() else None
    except OSError:
        return None


def _checked_request(
    output: str | Path, opset: int, fp16: bool, int8: Int8Config | None, images: str | Path | None
) -> Path:
    """The output path and the options, checked before the checkpoint is looked at."""
    out = Path(output)
    if str(output) == "-":  # not standard output: a file named "-" appeared in the working folder
        raise ExportError(
            "-o -: the model is written to a file (renamed into place); give a name such as model.onnx"
        )
    try:  # before is_dir(), which raises for a name too long or a loop of links
        check_name(out, "-o")
    except OutputError as exc:
        raise ExportError(str(exc)) from None
    if out.is_dir():
        raise ExportError(f"output {out} is a directory; expected a file path such as model.onnx")
    if images is not None and out.is_file() and Path(images).is_file() and out.samefile(images):
        raise ExportError(
            f"output {out} is the --images list; it would be overwritten: give the model its own name"
        )
    if out.is_symlink():  # the model is renamed into place: that replaces the link, not what it points to
        raise ExportError(
            f"output {out} is a link to {out.readlink()}; writing the model would replace the link with a "
            "file: give the link's target or another name"
        )
    kind = _kind(out)
    if kind == "checkpoint":  # e.g. -o the checkpoint itself: the training would be lost
        raise ExportError(
            f"output {out} is a PyTorch checkpoint; it would be overwritten: give the model its own name"
        )
    replaceable = kind in (None, "ONNX model", "empty") or (out.suffix.lower() == ".onnx" and kind == "other")
    if not replaceable:  # a manifest, an image, notes: only a model (or a file named as one) is replaced
        what = f"a {kind}" if kind and kind.endswith("image") else "a file that is not an exported model"
        raise ExportError(
            f"output {out} is {what}; it would be overwritten: give the model its own name (an existing "
            ".onnx file is replaced)"
        )
    try:  # before the export's minutes of work: the folder must exist or be creatable, and writable
        check_output_file(out, "-o", special_ok=False)
    except OutputError as exc:
        raise ExportError(str(exc)) from None
    problem = opset_problem(opset)
    if problem:
        raise ExportError(problem)
    if fp16 and int8 is not None:
        raise ExportError("--fp16 and --int8 exclude each other: fp16 is for GPUs, int8 for CPUs")
    return out


def _model_fits(model: nn.Module, info: dict[str, Any], meta: ModelMetadata) -> tuple[str, int]:
    """The output link and the smallest side the graph runs on, once the model is known to match
    what the checkpoint says about its inputs, outputs and loader."""
    in_chans = getattr(model, "in_chans", meta.channels)
    if in_chans != meta.channels:
        raise ExportError(
            f"model has in_chans={in_chans} but the checkpoint's loader has channels={meta.channels}"
        )
    link, _ = checkpoint_grading(info)
    try:
        n_out = head_linear(model).out_features
    except TypeError as exc:
        raise ExportError(str(exc)) from None
    if n_out != raw_outputs(len(meta.class_names), link):
        raise ExportError(
            f"model has {n_out} outputs but the checkpoint names {len(meta.class_names)} classes "
            f"{meta.class_names!r} ({link} link)"
        )
    min_side = int(getattr(model, "min_input_size", 1))
    if meta.loader.min_size < min_side:  # the runtime would pass images the graph cannot run
        raise ExportError(
            f"the checkpoint's loader admits sides from {meta.loader.min_size} px but model {info['model_name']!r} "
            f"needs at least {min_side} px (min_input_size): retrain with data.loader.min_size >= {min_side}"
        )
    return link, min_side


def _fused(model: nn.Module, log: Callable[[str], None]) -> tuple[nn.Module, FuseReport]:
    """BatchNorm folded into the convolutions; what cannot fold becomes a per-channel affine."""
    fused, report = fuse_conv_bn_report(model)
    log(f"fuse: {report.summary()}")
    if report.kept:
        try:
            frozen = replace_bn_with_affine(fused)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        log(f"fuse: exporting unfoldable BatchNorm {', '.join(frozen)} as per-channel Mul/Add")
    return fused, report


def _graph(
    graph: nn.Module, meta: ModelMetadata, min_side: int, opset: int, *, cam: bool, fp16: bool
) -> onnx.ModelProto:
    """The checked ONNX graph of ``graph`` (fp16 on a copy, so the fp32 reference stays)."""
    wrapper = ExportWrapper(copy.deepcopy(graph) if fp16 else graph, cam=cam, fp16=fp16).eval()
    try:
        proto = to_onnx(wrapper, meta.channels, min_side, opset)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {meta.model_name}: {typed_first_line(exc)}") from exc
    check_graph(proto, meta.outputs, meta.channels, opset)
    return proto


def _parity(
    proto: onnx.ModelProto,
    references: dict[str, nn.Module],
    info: dict[str, Any],
    channels: int,
    min_side: int,
    *,
    parity_images: int,
    images_dir: str | Path | None,
    paths: list[str],
    fp16: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The parity gate's figures (it raises when the graph does not compute what PyTorch does)."""
    inputs = parity_inputs(info, channels, min_side, parity_images=parity_images, paths=paths)
    for s in inputs.real_skipped:
        log(f"parity: skipped image {s}")
    if parity_images > 0 and inputs.real_images == 0:
        if images_dir is not None:  # readable at the start (_check_images_readable), gone since
            raise ExportError(
                f"--images {images_dir}: none of its images could be read now (first: {inputs.real_skipped[0]}); "
                "nothing was written"
            )
        log("parity: warning: no usable images in the checkpoint's val_paths; checked on random inputs only")
    return check_parity(proto.SerializeToString(), references, inputs, fp16=fp16)


def _earned(
    proto: onnx.ModelProto,
    meta: ModelMetadata,
    int8: tuple[Int8Config, Int8Plan] | None,
    earn: Callable[[bytes, ModelMetadata], dict[str, Any]],
    cuts: Callable[[bytes, ModelMetadata], dict[str, Any]],
    log: Callable[[str], None],
) -> tuple[bytes, ModelMetadata, float | None]:
    """The bytes to write and their metadata: cut points and threshold earned on the graph that ships
    (the int8 one when asked); and the seconds from here to the int8 graph, when int8 was asked."""
    t0 = time.perf_counter()
    set_metadata(proto, meta)
    data = proto.SerializeToString()
    if meta.grading.get("rule") == "cuts":  # the fp32 graph's own cut points (int8 re-earns them below)
        meta = replace(meta, **cuts(data, meta))
        set_metadata(proto, meta)
        data = proto.SerializeToString()
    int8_s = None
    if int8 is not None:
        data, figures, earned = quantize_model(data, meta, int8[0], int8[1], log, earn)
        parity = {**meta.parity, "graph": "fp32, before int8 quantisation"}
        meta = replace(meta, int8=True, quantization=figures, parity=parity)
        meta = replace(meta, **cuts(data, meta))  # written with the threshold below
        int8_s = time.perf_counter() - t0
    else:
        earned = earn(data, meta)
    meta = replace(meta, **earned)
    return with_metadata(data, meta), meta, int8_s


def export_model(
    model: nn.Module,
    info: dict[str, Any],
    output: str | Path,
    *,
    cam: bool = True,
    fp16: bool = False,
    opset: int = MIN_OPSET,
    parity_images: int = 16,
    images_dir: str | Path | None = None,
    threshold: float | None = None,
    checkpoint_sha256: str | None = None,
    int8: Int8Config | None = None,
    tta: str = "none",
    target_recall: float | None = None,
    cuts_for: str | None = None,
    tamper: Callable[[onnx.ModelProto], None] | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Fuse, export, verify and atomically write ``model`` (+ checkpoint ``info``) to ``output``.

    ``int8``: also quantise the verified fp32 graph to static int8 for CPU line PCs, gated on its
    agreement with fp32 on held-back real images (:mod:`.quantize`); the int8 graph is written.
    ``tta``: build test-time flips into the graph (:class:`~defectscope.models.tta.FlipTTA`); the
    parity gate then compares against the same flips in PyTorch.
    ``threshold``: set by hand; otherwise it is chosen again on the written graph for ``target_recall``
    (default: the checkpoint's) on labelled images (:mod:`.threshold`, whose errors are
    :class:`~.threshold.ThresholdError`).  ``cuts_for``: what a ``cuts`` grading rule's cut points are
    chosen for on the graph (default: the checkpoint's).
    ``tamper`` is a fault-injection hook for tests: it may alter the graph after export and before
    the parity gate, which must then catch it.
    """
    t_start = time.perf_counter()
    out = _checked_request(output, opset, fp16, int8, images_dir)
    meta = build_metadata(
        info, model, cam=cam, fp16=fp16, threshold=threshold, checkpoint_sha256=checkpoint_sha256,
        tta=tta, cuts_for=cuts_for,
    )  # fmt: skip
    link, min_side = _model_fits(model, info, meta)
    listed, int8_plan, threshold_plan = _plans(
        info, images_dir, int8, target_recall=target_recall, by_hand=threshold, grading=meta.grading, log=log
    )
    model = model.eval()
    fused, report = _fused(model, log)
    t_fused = time.perf_counter()

    references: dict[str, nn.Module] = {"fused": with_link(fused, link), "unfused": with_link(model, link)}
    if tta != "none":
        references = {name: FlipTTA(m, tta).eval() for name, m in references.items()}
    proto = _graph(references["fused"], meta, min_side, opset, cam=cam, fp16=fp16)
    if tamper is not None:
        tamper(proto)
    t_exported = time.perf_counter()
    numbers = _parity(
        proto, references, info, meta.channels, min_side,
        parity_images=parity_images, images_dir=images_dir, paths=listed, fp16=fp16, log=log,
    )  # fmt: skip
    t_parity = time.perf_counter()
    earn = partial(earn_threshold, plan=threshold_plan)
    cuts = partial(earn_cuts, info=info, images=threshold_plan.images, log=log)
    data, meta, int8_s = _earned(proto, replace(meta, parity=numbers), int8_plan, earn, cuts, log)
    t_earned = time.perf_counter()
    atomic_write_bytes(out, data)
    t_end = time.perf_counter()
    seconds = {
        "fuse": round(t_fused - t_start, 3),
        "export": round(t_exported - t_fused, 3),
        "parity": round(t_parity - t_exported, 3),
        **({"int8": round(int8_s, 3)} if int8_s is not None else {}),
        "threshold": round(t_earned - t_parity - (int8_s or 0.0), 3),
        "write": round(t_end - t_earned, 3),
        "total": round(t_end - t_start, 3),
    }
    return ExportResult(out, len(data), seconds, numbers, meta, report, data)
