"""`defectscope export CKPT -o model.onnx`: checkpoint -> verified ONNX (+ optional MLflow registry).

Exit codes: 0 written; 1 the export ran but failed its checks (parity, the int8 gate, MLflow); 2 bad
input (arguments, checkpoint, model that cannot be exported or quantised, too few int8 images).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defectscope.runtime.decision import RECALL_EXPECTED, is_recall_target
from defectscope.runtime.files import checkpoint_file_problem, error_line, unusable_name
from defectscope.runtime.grading import CUTS_FOR, grading_text
from defectscope.runtime.interrupts import terminate_as_interrupt
from defectscope.runtime.metadata import TTA_NAMES
from defectscope.runtime.options import CommandParser, unit_number, whole_at_least
from defectscope.runtime.outputs import OutputError, check_name

from .opset import MIN_OPSET, opset_problem
from .quantize import (
    AUTO_FP32_STEPS,
    AUTO_MIN_CONVS,
    DEFAULT_FP32_CONVS,
    FP32_CONVS_STEP,
    INT8_METHODS,
    Int8Config,
)

if TYPE_CHECKING:
    from .onnx_export import ExportResult

_count, _positive = whole_at_least(0), whole_at_least(1)


def _recall(text: str) -> float:
    """argparse type: a recall target, by the rule of every other reader (:func:`is_recall_target`)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not is_recall_target(value):
        raise argparse.ArgumentTypeError(f"expected {RECALL_EXPECTED}, got {text!r}")
    return value


def _add_int8_arguments(p: argparse.ArgumentParser) -> None:
    """--int8 and its calibration and gate settings (turned into an Int8Config by _int8_config)."""
    q = p.add_argument_group(
        "int8 (CPU line PCs)",
        "static int8 quantisation calibrated on real images (--images DIR|LIST or the checkpoint's "
        "val_paths), gated on agreement with fp32 on held-back images; needs a CPU with VNNI for speed",
    )
    q.add_argument("--int8", action="store_true", help="write a QDQ int8 model instead of fp32")
    q.add_argument(
        "--calib-images",
        type=_positive,
        metavar="N",
        help=f"calibration images (default {Int8Config.calib_images})",
    )
    q.add_argument(
        "--check-images",
        type=_positive,
        metavar="N",
        help=f"held-back images the int8 gate compares on (default {Int8Config.check_images})",
    )
    q.add_argument(
        "--calibration",
        choices=INT8_METHODS,
        help=f"activation range estimate (default {Int8Config.method})",
    )
    q.add_argument(
        "--min-agreement",
        type=unit_number,
        metavar="F",
        help="gate: share of held-back images whose class and OK/NG verdict must match fp32 "
        f"(default {Int8Config.min_agreement})",
    )
    q.add_argument(
        "--reduce-range",
        action="store_true",
        default=None,
        help="7-bit weights, for line PCs without VNNI (avoids uint8 x int8 saturation)",
    )
    q.add_argument(
        "--fp32-convs",
        type=_count,
        metavar="N",
        help="the convolutions within N layers of the input stay fp32: they see the image at full "
        "resolution in few channels, where 8 bits cost the most accuracy for little compute (default: "
        f"{DEFAULT_FP32_CONVS} where {AUTO_MIN_CONVS} or more convolutions come before the head, else 0; 0 quantises every one). "
        f"Left out, a failed gate on a deep network is retried with {FP32_CONVS_STEP} more, at most {AUTO_FP32_STEPS} times",
    )


def _add_decision_arguments(p: argparse.ArgumentParser) -> None:
    """How the shipped decision rule is set: the threshold (by hand or for a recall) and grade cut points."""
    p.add_argument(
        "--threshold",
        type=unit_number,
        metavar="T",
        help="set the decision threshold by hand (recorded as such) instead of choosing it on the "
        "exported graph for the recall target",
    )
    p.add_argument(
        "--target-recall",
        type=_recall,
        metavar="R",
        help="defect recall the threshold is chosen for on the exported graph (default: the "
        "checkpoint's threshold.target_recall)",
    )
    p.add_argument(
        "--cuts-for",
        choices=CUTS_FOR,
        help="ordered grades with cut points (ordinal.rule=cuts): choose them on the exported graph for "
        "accuracy or for balanced accuracy (default: the checkpoint's ordinal.cuts_for)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="defectscope export",
        description="Fold BatchNorm, export to ONNX (dynamic batch/height/width), check parity with "
        "PyTorch in ONNX Runtime, embed the defectscope metadata and write the file atomically.",
    )
    p.add_argument("checkpoint", type=Path, help="training checkpoint (.ckpt) written by `defectscope train`")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the .onnx model")
    p.add_argument("--no-cam", action="store_true", help="leave out the class-activation-map output 'cam'")
    p.add_argument(
        "--fp16", action="store_true", help="half-precision weights/compute (fp32 inputs and outputs)"
    )
    p.add_argument(
        "--tta",
        choices=TTA_NAMES,
        default="none",
        help="build test-time views into the graph: hflip = 2 views, flips = 4 views (left-right, "
        "up-down, both), dihedral = 8 (the flips and the transposed image's flips: every 90° rotation "
        "and mirror); logits averaged, heat maps too; costs that many backbone passes per image "
        "(default %(default)s)",
    )
    _add_int8_arguments(p)
    p.add_argument(
        "--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET}; default %(default)s)"
    )
    p.add_argument(
        "--parity-images",
        type=_count,
        default=16,
        metavar="N",
        help="real validation images for the parity gate (default %(default)s; 0 = random inputs only)",
    )
    p.add_argument(
        "--images",
        type=Path,
        metavar="DIR|CSV|LIST",
        help="images for parity, int8 calibration and the threshold, instead of the checkpoint's "
        "validation images: a folder of class folders or a CSV with header path,label (labelled: the "
        "threshold is chosen on them), or a flat folder / a text file listing one path per line "
        "(unlabelled: the threshold is chosen on the checkpoint's validation images)",
    )
    _add_decision_arguments(p)
    p.add_argument(
        "--mlflow", action="store_true", help="log and register the model in the checkpoint's MLflow run"
    )
    p.add_argument(
        "--register-name", metavar="NAME", help="registered model name (default defectscope-<model>)"
    )
    return p


def threshold_summary(source: dict[str, Any]) -> list[str]:
    """How the embedded threshold was earned, and a loud warning with the trade-off when it costs too much."""
    from defectscope.evaluation.threshold import threshold_lines

    from .threshold import HOW_TO_CHANGE

    if source.get("method") != "recall target":
        return [
            f"threshold: {source['threshold']:g}, set by hand (--threshold); not checked against a recall target"
        ]
    where = f"{source['variant']} graph in ONNX Runtime, {source['images']}"
    return [
        "threshold: " + line if i == 0 else line
        for i, line in enumerate(threshold_lines(source, where, HOW_TO_CHANGE))
    ]


#: --int8's settings: None unless given (their defaults live in Int8Config), so a setting without --int8 is seen
INT8_OPTIONS = {
    "calib_images": "--calib-images",
    "check_images": "--check-images",
    "calibration": "--calibration",
    "min_agreement": "--min-agreement",
    "reduce_range": "--reduce-range",
    "fp32_convs": "--fp32-convs",
}


def usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of options, before any work."""
    int8_only = [flag for key, flag in INT8_OPTIONS.items() if getattr(args, key) is not None]
    if int8_only and not args.int8:
        them = "it" if len(int8_only) == 1 else "them"
        fix = f"drop {them} (--fp16 excludes --int8)" if args.fp16 else f"add --int8, or drop {them}"
        return (
            f"{', '.join(int8_only)} {'applies' if them == 'it' else 'apply'} only with --int8 "
            f"(an fp32 or fp16 export would ignore {them}): {fix}"
        )
    if problem := opset_problem(args.opset):
        return problem
    try:  # the library checks it again (a library caller), with the same words
        check_name(args.output, "-o")
    except OutputError as exc:
        return str(exc)
    if args.images is not None and (unusable := unusable_name(args.images)):
        return f"--images {args.images}: cannot be read ({unusable})"
    if args.images is not None and not (args.images.is_dir() or args.images.is_file()):
        return f"--images {args.images}: not an existing directory or list file"
    if args.register_name is not None and not args.mlflow:
        return "--register-name only makes sense together with --mlflow"
    if args.threshold is not None and args.target_recall is not None:
        return "--threshold sets the threshold by hand; --target-recall chooses it: give one"
    if args.int8 and args.fp16:
        return "--fp16 and --int8 exclude each other: fp16 is for GPU line PCs, int8 for CPUs"
    return None


def _fail(code: int, message: str) -> int:
    print(error_line("defectscope export", message), file=sys.stderr)
    return code


def _int8_config(args: argparse.Namespace) -> Int8Config | None:
    """The int8 options as the library's typed config (None without --int8); checked on creation."""
    if not args.int8:
        return None
    given = {key: getattr(args, key) for key in INT8_OPTIONS if getattr(args, key) is not None}
    if "calibration" in given:
        given["method"] = given.pop("calibration")
    return Int8Config(**given)


def print_result(result: ExportResult) -> None:
    """What the export measured and wrote: parity, the int8 gate, the threshold's origin, time and size."""
    from .parity import format_numbers

    p = result.parity
    print(
        f"parity (ONNX Runtime CPU vs PyTorch fused and unfused; {len(p['random_shapes'])} random batches, "
        f"{p['real_images']} real images):"
    )
    print(format_numbers({k: v for k, v in p.items() if k != "random_shapes"}))
    if result.metadata.int8:
        print("int8 gate (int8 vs fp32 ONNX Runtime CPU, held-back images):")
        print(format_numbers(result.metadata.quantization))
    print("\n".join(threshold_summary(result.metadata.threshold_source)))
    grading = grading_text(result.metadata.grader, result.metadata.grading_source)
    if grading:
        print(f"grading: {grading}")
    s = result.seconds
    parts = ", ".join(f"{k} {v:.2f}" for k, v in s.items() if k != "total")
    print(f"export time: {s['total']:.2f} s ({parts})")
    print(
        f"file size: {result.size_bytes / 1e6:.2f} MB ({result.size_bytes} bytes), {result.metadata.variant}"
    )
    print(f"wrote {result.path.resolve()}")


def main(argv: Sequence[str] | None = None) -> int:
    """``defectscope export``; SIGTERM stops it as Ctrl+C does (its temporary files removed, one line)."""
    with terminate_as_interrupt():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse has printed usage and the problem
        return int(exc.code or 0)
    problem = usage_problem(args)
    if problem:
        return _fail(2, problem)
    not_a_checkpoint = checkpoint_file_problem(args.checkpoint)
    if not_a_checkpoint:
        return _fail(2, not_a_checkpoint)

    from .quantize import Int8GateError, QuantizationError

    try:
        int8 = _int8_config(args)
    except QuantizationError as exc:
        return _fail(2, str(exc))

    import onnx

    from defectscope.checkpoint import CheckpointError, load_checkpoint
    from defectscope.runtime.files import file_sha256

    from .mlflow_log import MlflowExportError, log_onnx_model, preflight
    from .onnx_export import ExportError, export_model
    from .parity import ParityError, format_numbers

    try:
        model, info = load_checkpoint(args.checkpoint)
        print(
            f"checkpoint: {args.checkpoint} ({info['model_name']}, classes {', '.join(info['class_names'])})"
        )
        if args.mlflow:  # a wrong store or run fails now, before any work and with nothing written
            print(f"mlflow: {preflight(info)}, run {info.get('mlflow_run_id') or '(none: a new run)'}")
        result = export_model(
            model,
            info,
            args.output,
            cam=not args.no_cam,
            fp16=args.fp16,
            opset=args.opset,
            parity_images=args.parity_images,
            images_dir=args.images,
            threshold=args.threshold,
            checkpoint_sha256=file_sha256(args.checkpoint),
            int8=int8,
            tta=args.tta,
            target_recall=args.target_recall,
            cuts_for=args.cuts_for,
        )
    except (CheckpointError, ExportError) as exc:
        return _fail(2, str(exc))
    except MlflowExportError as exc:
        return _fail(2, f"{exc}; nothing was exported")
    except (ParityError, Int8GateError) as exc:
        print(format_numbers(exc.numbers), file=sys.stderr)
        return _fail(1, f"{exc}; nothing was written to {args.output}")

    print_result(result)

    if args.mlflow:
        try:
            uri = log_onnx_model(
                onnx.load_from_string(result.model_bytes),
                result.metadata,
                info,
                register_name=args.register_name,
            )
        except MlflowExportError as exc:
            return _fail(1, f"{exc} (the ONNX file itself was written to {result.path})")
        print(f"mlflow: registered {uri}")
    return 0
