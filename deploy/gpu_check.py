"""End-to-end check of defectscope's GPU path on an NVIDIA PC: one verdict line per check.

    deploy/gpu_check.sh [MODEL.onnx] [--ckpt CKPT] [--images DIR] [--providers tensorrt,cuda,cpu] ...

Without MODEL it builds one (train extra and this checkout needed): ``--preset`` with seeded random
weights, exported fp32 and fp16 by the project's exporter; eager PyTorch then runs that network.
With MODEL, the eager row needs --ckpt.  Checks (PASS / WARN / FAIL / SKIP): providers,
start-<provider>, parity[-fp16], cache-reuse, cache-invalidate, second-process, throughput; what
each shows is tabled in deploy/README.md.  Every provider start runs in its own process, as on a
line PC, with the real engine cache.  Exit status 0 when no check FAILs; results also go to
WORKDIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PROVIDERS = ("tensorrt", "cuda", "cpu")
RESULTS: list[dict[str, Any]] = []


def verdict(status: str, name: str, detail: str, **data: Any) -> str:
    RESULTS.append({"check": name, "verdict": status, "detail": detail, **data})
    print(f"{status:<5} {name:<17} {detail}", flush=True)
    return status


# -- one provider start, in its own process ---------------------------------------------------------


def child(model: str, provider: str, cache: str, images_file: str, max_side: int | None) -> None:
    """Start ``provider`` on ``model`` and print one JSON line: start time, placement, probabilities."""
    from defectscope.runtime import Inspector

    images = json.loads(Path(images_file).read_text())
    notes: list[str] = []
    t0 = time.perf_counter()
    insp = Inspector(model, provider=provider, trt_cache_dir=cache, trt_max_side=max_side, log=notes.append)
    start_s = time.perf_counter() - t0
    probs = [insp.predict(insp.preprocess([p]), cam=False)["probs"][0] for p in images]
    doc = {
        "start_s": start_s,
        "summary": insp.provider_summary,
        "notes": notes,
        "sha256": insp.sha256,
        "probs": [p.tolist() for p in probs],
        "verdicts": [insp.decide(p).verdict for p in probs],
        "tolerance": insp.metadata.parity.get("prob_tolerance"),
    }
    print(json.dumps(doc))


def start(model: Path, provider: str, cache: Path, args: argparse.Namespace) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--child", str(model), provider, str(cache), str(args.images_file)]
    cmd += [str(args.trt_max_side)] if args.trt_max_side else []
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The child's JSON, or ``{"error": last stderr line}``."""
    out, err = proc.communicate()
    if proc.returncode == 0 and out.strip():
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}


def run(model: Path, provider: str, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    return finish(start(model, provider, cache, args))


# -- models and images ------------------------------------------------------------------------------


def prepare_models(args: argparse.Namespace, work: Path) -> tuple[dict[str, Path], Any]:
    """{"fp32": path[, "fp16": path]} and the eager network (or a reason string)."""
    if args.model:
        eager: Any = "give --ckpt (the checkpoint MODEL came from) for the eager PyTorch row"
        if args.ckpt:
            from defectscope.checkpoint import load_checkpoint

            eager = load_checkpoint(args.ckpt)[0]
        return {"fp32": Path(args.model)}, eager
    from bench_common import build_model, export, preset_config

    cfg = preset_config(args.preset)
    net = build_model(cfg, 3, seed=0)
    paths = {
        v: export(net, cfg, 3, work / "models" / f"{args.preset}_{v}.onnx", fp16=v == "fp16")
        for v in ("fp32", "fp16")
    }
    return paths, net


def image_list(args: argparse.Namespace, work: Path, model: Path) -> list[str]:
    from defectscope.runtime.files import is_image_name

    if args.images:
        found = sorted(str(p) for p in Path(args.images).iterdir() if is_image_name(p.name))
        return found[: args.n_images]
    from bench_inspect import make_images  # deploy/, beside this script

    from defectscope.runtime.trt import largest_side

    insp = _cpu_inspector(model, args)
    cfg = insp.loader_config
    top = largest_side(cfg) or args.trt_max_side or 1024
    return [str(p) for p in make_images(work / "images", args.n_images, max(cfg.min_size, top // 3), top)]


def _cpu_inspector(model: Path, args: argparse.Namespace) -> Any:
    from defectscope.runtime import Inspector

    return Inspector(model, provider="cpu", log=lambda _m: None)


# -- checks -----------------------------------------------------------------------------------------


def check_providers(wanted: list[str]) -> str:
    from defectscope.runtime.providers import import_ort  # as the runtime imports it (telemetry off)

    ort = import_ort()

    have = ort.get_available_providers()
    missing = [
        p
        for p in wanted
        if {"tensorrt": "Tensorrt", "cuda": "CUDA", "cpu": "CPU"}[p] + "ExecutionProvider" not in have
    ]
    detail = f"onnxruntime {ort.__version__}: {', '.join(have)}"
    return verdict(
        "FAIL" if missing else "PASS",
        "providers",
        detail + (f"; missing {', '.join(missing)}" if missing else ""),
    )


def check_start(provider: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return verdict("FAIL", f"start-{provider}", r["error"])
    warn = [n for n in r["notes"] if "only " in n or "differs from the CPU" in n or "fallback" in n]
    detail = f"{r['summary']}; start {r['start_s']:.1f} s" + (f"; {warn[0]}" if warn else "")
    return verdict("WARN" if warn else "PASS", f"start-{provider}", detail, start_s=r["start_s"])


def compare(ref: dict[str, Any], r: dict[str, Any]) -> tuple[float, int]:
    """Largest |Δp| and the number of images whose verdict differs."""
    diff = float(np.max(np.abs(np.asarray(r["probs"]) - np.asarray(ref["probs"]))))
    return diff, sum(a != b for a, b in zip(ref["verdicts"], r["verdicts"]))


def check_parity(name: str, runs: dict[str, dict[str, Any]], fallback_tol: float) -> str:
    ref = runs.get("cpu")
    others = {p: r for p, r in runs.items() if p != "cpu" and "error" not in r}
    if ref is None or "error" in ref or not others:
        return verdict("SKIP", name, "needs the CPU and at least one GPU provider started")
    tol = ref.get("tolerance") or fallback_tol
    parts, status = [], "PASS"
    for p, r in others.items():
        diff, flips = compare(ref, r)
        parts.append(f"{p} max |Δp| {diff:.1e}, {flips} verdict(s) differ")
        status = "FAIL" if flips else ("WARN" if diff > tol and status == "PASS" else status)
    detail = f"{len(ref['probs'])} images vs cpu, tolerance {tol:g}: " + "; ".join(parts)
    return verdict(status, name, detail)


def engine_files(cache: Path, sha256: str) -> dict[str, tuple[int, int]]:
    folder = cache / sha256[:16]
    files = (
        [f for f in folder.rglob("*") if f.is_file() and ".run-" not in str(f.relative_to(folder))]
        if folder.is_dir()
        else []
    )
    return {str(f.relative_to(cache)): (f.stat().st_size, f.stat().st_mtime_ns) for f in files}


def check_cache_reuse(model: Path, cache: Path, cold: dict[str, Any], args: argparse.Namespace) -> str:
    if "error" in cold:
        return verdict("SKIP", "cache-reuse", "TensorRT did not start")
    before = engine_files(cache, cold["sha256"])
    engines = [k for k in before if k.endswith(".engine")]
    warm = run(model, "tensorrt", cache, args)
    if "error" in warm:
        return verdict("FAIL", "cache-reuse", f"second start failed: {warm['error']}")
    after = engine_files(cache, cold["sha256"])
    detail = (
        f"cold start {cold['start_s']:.1f} s, warm {warm['start_s']:.1f} s; {len(engines)} engine file(s)"
    )
    ok = engines and before == after and warm["start_s"] < cold["start_s"]
    return verdict(
        "PASS" if ok else "FAIL",
        "cache-reuse",
        detail + ("" if before == after else "; the warm start rewrote the cache"),
    )


def other_model(model: Path, work: Path) -> tuple[Path, bool]:
    """A different model under the same file name; True when its weights differ too (needs onnx)."""
    dst = work / "other" / model.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(str(model))
        gemm = next(n for n in proto.graph.node if "logits" in n.output and len(n.input) == 3)
        bias = next(t for t in proto.graph.initializer if t.name == gemm.input[2])
    except (ImportError, StopIteration):  # same graph, different bytes: a valid unknown protobuf field
        dst.write_bytes(model.read_bytes() + bytes([0x98, 0x06, 0x01]))
        return dst, False
    shift = np.linspace(-2, 2, bias.dims[0]).astype(np.float32)  # moves probability between classes
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + shift, bias.name))
    onnx.save(proto, str(dst))
    return dst, True


def check_invalidation(
    model: Path, cache: Path, first: dict[str, Any], args: argparse.Namespace, work: Path
) -> str:
    if "error" in first:
        return verdict("SKIP", "cache-invalidate", "TensorRT did not start")
    other, reweighted = other_model(model, work)
    trt, cpu = run(other, "tensorrt", cache, args), run(other, "cpu", cache, args)
    if "error" in trt or "error" in cpu:
        return verdict("FAIL", "cache-invalidate", trt.get("error") or cpu.get("error", ""))
    own_folder = bool(engine_files(cache, trt["sha256"])) and trt["sha256"][:16] != first["sha256"][:16]
    diff, flips = compare(cpu, trt)
    stale = compare(first, trt)[0] if reweighted else None
    ok = own_folder and flips == 0 and (stale is None or stale > diff)
    detail = f"new engine folder {own_folder}; vs its own CPU max |Δp| {diff:.1e}" + (
        f"; vs the old model's engine {stale:.1e}"
        if stale is not None
        else " (same weights: onnx not installed)"
    )
    return verdict("PASS" if ok else "FAIL", "cache-invalidate", detail)


def check_second_process(
    model: Path, first: dict[str, Any], ref: dict[str, Any], args: argparse.Namespace, work: Path
) -> str:
    if "error" in first:
        return verdict("SKIP", "second-process", "TensorRT did not start")
    cache = work / "trt-shared"
    shutil.rmtree(cache, ignore_errors=True)
    racing = [start(model, "tensorrt", cache, args) for _ in range(2)]
    results = [finish(p) for p in racing] + [run(model, "tensorrt", cache, args)]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return verdict("FAIL", "second-process", f"{len(errors)} of 3 starts failed: {errors[0]}")
    flips = sum(compare(ref, r)[1] for r in results) if "error" not in ref else 0
    detail = "two cold starts at once {:.1f} s / {:.1f} s, then warm {:.1f} s; {} verdict(s) differ from cpu".format(
        *(r["start_s"] for r in results), flips
    )
    return verdict("PASS" if flips == 0 else "FAIL", "second-process", detail)


def images_per_s(call: Any, images: int, seconds: float) -> float:
    for _ in range(3):  # warm-up: lazy allocations, cuDNN/TensorRT autotuning
        call()
    done, t0 = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - t0 < seconds:
        call()
        done += images
    return done / (time.perf_counter() - t0)


def check_throughput(
    model: Path, eager: Any, providers: list[str], cache: Path, args: argparse.Namespace
) -> str:
    """One batch at the largest size the model takes; ORT rows include the copies to and from the GPU."""
    from defectscope.runtime import Inspector
    from defectscope.runtime.trt import largest_side

    cfg = _cpu_inspector(model, args).loader_config
    side = largest_side(cfg) or args.trt_max_side or 512
    batch = np.random.default_rng(0).standard_normal((args.batch, cfg.channels, side, side), dtype=np.float32)
    rates: dict[str, float] = {}
    for p in providers:
        try:
            insp = Inspector(
                model, provider=p, trt_cache_dir=cache, trt_max_side=args.trt_max_side, log=lambda _m: None
            )
        except Exception:
            continue  # its start check already said why
        rates[p] = images_per_s(lambda insp=insp: insp.predict(batch, cam=False), args.batch, args.seconds)
        del insp
    note = eager if isinstance(eager, str) else ""
    if not note:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        net = eager.to(dev).eval()

        def call() -> None:
            with torch.inference_mode():
                net(torch.from_numpy(batch).to(dev)).softmax(1).cpu()

        rates[f"eager-{dev}"] = images_per_s(call, args.batch, args.seconds)
    detail = f"batch {args.batch}x{cfg.channels}x{side}x{side}: " + ", ".join(
        f"{k} {v:.0f}" for k, v in rates.items()
    )
    gpu = max((rates[p] for p in ("tensorrt", "cuda") if p in rates), default=None)
    if gpu is None or "eager-cuda" not in rates:
        return verdict(
            "SKIP",
            "throughput",
            f"{detail} images/s; no GPU pair to compare{'; ' + note if note else ''}",
            rates=rates,
        )
    status = "PASS" if gpu >= rates["eager-cuda"] else "WARN"
    return verdict(
        status, "throughput", f"{detail} images/s ({gpu / rates['eager-cuda']:.2f}x eager)", rates=rates
    )


# -- driver -----------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="deploy/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="exported .onnx model (default: build one from --preset)")
    p.add_argument("--ckpt", help="checkpoint MODEL was exported from, for the eager PyTorch row")
    p.add_argument("--images", help="folder of images for the parity checks (default: synthetic)")
    p.add_argument("--n-images", type=int, default=24, help="images compared across providers (default 24)")
    p.add_argument(
        "--providers", default=",".join(PROVIDERS), help="providers to check (default tensorrt,cuda,cpu)"
    )
    p.add_argument("--preset", default="efficientnet_lite0", help="conf/model preset built without MODEL")
    p.add_argument("--trt-max-side", type=int, default=None, help="for native-size models (max_side null)")
    p.add_argument(
        "--workdir", help="keeps models, images, caches and gpu_check.json (default: a temp folder)"
    )
    p.add_argument("--seconds", type=float, default=5.0, help="timing per throughput row (default 5)")
    p.add_argument("--batch", type=int, default=16, help="throughput batch (default 16)")
    p.add_argument("--tol", type=float, default=0.01, help="|Δp| tolerance when the model records none")
    args = p.parse_args(argv)
    bad = sorted(set(args.providers.split(",")) - set(PROVIDERS))
    if bad:
        p.error(f"--providers: unknown {', '.join(bad)}; choose from {', '.join(PROVIDERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(*argv[1:5], int(argv[5]) if len(argv) > 5 else None)
        return 0
    args = parse(argv)
    providers = [p for p in PROVIDERS if p in args.providers.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="defectscope-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check_providers(providers)
    models, eager = prepare_models(args, work)
    args.images_file = work / "images.json"
    args.images_file.write_text(json.dumps(image_list(args, work, models["fp32"])))
    cache = work / "trt"
    shutil.rmtree(cache, ignore_errors=True)  # the first TensorRT start must be a cold one
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, path in models.items():
        runs[variant] = {p: run(path, p, cache, args) for p in providers}
        if variant == "fp32":
            for p in providers:
                check_start(p, runs[variant][p])
        check_parity("parity" if variant == "fp32" else f"parity-{variant}", runs[variant], args.tol)
    first = runs["fp32"]
    if "tensorrt" in providers:
        check_cache_reuse(models["fp32"], cache, first["tensorrt"], args)
        check_invalidation(models["fp32"], cache, first["tensorrt"], args, work)
        ref = first.get("cpu", {"error": "cpu not checked"})
        check_second_process(models["fp32"], first["tensorrt"], ref, args, work)
    else:
        for name in ("cache-reuse", "cache-invalidate", "second-process"):
            verdict("SKIP", name, "tensorrt not among --providers")
    check_throughput(models["fp32"], eager, providers, cache, args)
    (work / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))
    counts = {v: sum(r["verdict"] == v for r in RESULTS) for v in ("PASS", "WARN", "FAIL", "SKIP")}
    print(
        "gpu_check: "
        + ", ".join(f"{n} {v}" for v, n in counts.items())
        + f"; details in {work / 'gpu_check.json'}"
    )
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
