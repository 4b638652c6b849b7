"""`defectscope export CKPT -o model.onnx`: checkpoint -> verified ONNX (+ optional MLflow registry).

Exit codes: 0 written; 1 the export ran but failed its checks (parity, MLflow); 2 bad input
(arguments, checkpoint, model that cannot be exported).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .onnx_export import MIN_OPSET


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
        "--images", type=Path, metavar="DIR", help="take parity images from DIR instead of val_paths"
    )
    p.add_argument(
        "--threshold",
        type=_threshold,
        metavar="T",
        help="decision threshold to embed (default: checkpoint's)",
    )
    p.add_argument(
        "--mlflow", action="store_true", help="log and register the model in the checkpoint's MLflow run"
    )
    p.add_argument(
        "--register-name", metavar="NAME", help="registered model name (default defectscope-<model>)"
    )
    return p


def _fail(code: int, message: str) -> int:
    print(f"defectscope export: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse has printed usage and the problem
        return int(exc.code or 0)
    if args.opset < MIN_OPSET:
        return _fail(2, f"--opset {args.opset} is too old; defectscope exports need opset >= {MIN_OPSET}")
    if args.images is not None and not args.images.is_dir():
        return _fail(2, f"--images {args.images}: not an existing directory")
    if args.register_name is not None and not args.mlflow:
        return _fail(2, "--register-name only makes sense together with --mlflow")

    import onnx

    from defectscope.checkpoint import CheckpointError, file_sha256, load_checkpoint

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
        )
    except (CheckpointError, ExportError) as exc:
        return _fail(2, str(exc))
    except MlflowExportError as exc:
        return _fail(2, f"{exc}; nothing was exported")
    except ParityError as exc:
        print(format_numbers(exc.numbers), file=sys.stderr)
        return _fail(1, f"{exc}; nothing was written to {args.output}")

    p = result.parity
    print(
        f"parity (ONNX Runtime CPU vs PyTorch fused and unfused; {len(p['random_shapes'])} random batches, "
        f"{p['real_images']} real images):"
    )
    print(format_numbers({k: v for k, v in p.items() if k != "random_shapes"}))
    s = result.seconds
    print(
        f"export time: {s['total']:.2f} s (fuse {s['fuse']:.2f}, export {s['export']:.2f}, "
        f"parity {s['parity']:.2f}, write {s['write']:.2f})"
    )
    print(
        f"file size: {result.size_bytes / 1e6:.2f} MB ({result.size_bytes} bytes){' fp16' if args.fp16 else ''}"
    )
    print(f"wrote {result.path.resolve()}")

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
