"""Decode-bound cases (issue 20): `defectscope inspect` against the all-cores CPU bound and a naive loop.

* **bound** = cores / (per-image CPU seconds of read + decode + resize + normalise + model). Each stage
  is timed on one thread (thread CPU time, so other load on the machine inflates it little) with the
  loader's own steps under the model's downscale policy; every staged result is checked equal to
  :func:`load_image`. The model runs on a one-thread ONNX Runtime session over the very batches
  inspect's :class:`Batcher` forms (its default batch size), normalised as inspect does.
* **naive** = one Python loop over the same inputs: the runtime loader, float conversion in numpy,
  ``session.run`` at batch 1 on an ONNX Runtime session with default options.
* **inspect** = the real CLI in a subprocess with its default options (``--provider cpu`` only);
  its own rate (start-up and model load left out) is the one compared. ``baseline`` runs the same
  command on another checkout's code for "before" figures.

Cases: (a) the e2e section's mixed PNGs with the benchmark model; (b) a small model (``tiny``, the
smoke experiment's) on 300² grey PNGs; (c) camera frames (5 MP: 2448x2048, grey and RGB, PNG and
JPEG) with the small model at max_side 512, under the ``exact`` and the ``fast`` downscale policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench_common import build_model, export, model_path, preset_config
from bench_e2e import run_inspect, write_listing

SMALL_PRESET = "tiny"  # the smoke experiment's model
CAMERA_KINDS = ("grey-png", "grey-jpg", "rgb-png", "rgb-jpg")
STAGES = ("read", "decode", "resize", "normalise", "model")


@dataclass(frozen=True)
class Case:
    """One row of the table: a model and its inputs (``images`` listed ``repeat`` times)."""

    name: str
    model: Path
    images: list[Path]
    repeat: int = 1
    baseline: bool = True  # the unchanged code can run it faithfully (it predates ``downscale``)

    @property
    def inputs(self) -> int:
        return len(self.images) * self.repeat


def small_model(workdir: Path, channels: int, downscale: str, seed: int) -> Path:
    """The small preset exported at max_side 512 with ``downscale`` (cached per workdir)."""
    cfg = preset_config(SMALL_PRESET)
    path = model_path(workdir, cfg, channels, downscale=downscale)
    if not path.is_file():
        export(build_model(cfg, channels, seed), cfg, channels, path, downscale=downscale)
    return path


def camera_frames(workdir: Path, kind: str, n: int, size: tuple[int, int]) -> list[Path]:
    """``n`` synthetic camera frames of ``size`` (w, h) and ``kind`` (e.g. grey-png), made once."""
    from defectscope.synth import render

    colour, ext = kind.split("-")
    channels = 1 if colour == "grey" else 3
    w, h = size
    folder = workdir / f"camera_{w}x{h}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{colour}_{i:03d}.{ext}"
        if not path.is_file():
            label = ("good", "scratch", "spot", "crack")[i % 4]
            img = Image.fromarray(render(0, i, label, channels, (max(size), max(size)))[:h, :w])
            tmp = path.with_name(f".{path.name}")
            img.save(
                tmp, format="JPEG" if ext == "jpg" else "PNG", **({"quality": 90} if ext == "jpg" else {})
            )
            tmp.replace(path)
        paths.append(path)
    return paths


def stage_costs(
    paths: Sequence[Path], model: Path, batch_size: int, inputs: int = 0, min_samples: int = 24
) -> dict[str, Any]:
    """Per-image CPU milliseconds of each stage on one thread (see the module docstring).

    Decoding is timed over every distinct image (several passes when there are fewer than
    ``min_samples``); normalise and model over the batches inspect forms from ``inputs`` inputs
    (the images listed again and again, as the case lists them).
    """
    from defectscope.runtime import Inspector
    from defectscope.runtime import image as loader
    from defectscope.runtime.image_file import read_image_bytes
    from defectscope.runtime.pipeline import Batcher, Item

    inspector = Inspector(model, provider="cpu", threads=1, log=lambda _m: None)
    cfg = inspector.loader_config
    clock = time.thread_time
    spent = dict.fromkeys(STAGES, 0.0)
    passes = max(1, math.ceil(min_samples / len(paths)))
    arrays: list[np.ndarray] = []
    for rep in range(passes):
        for p in paths:
            t0 = clock()
            data = read_image_bytes(p, loader.max_file_bytes(cfg.max_pixels))
            t1 = clock()
            img, size = loader._open(p, data, cfg)
            bands = loader._model_bands(img, cfg.channels) or img
            t2 = clock()
            arr = loader._model_array(bands, cfg, *loader.target_size(*size, cfg))
            t3 = clock()
            spent["read"] += t1 - t0
            spent["decode"] += t2 - t1
            spent["resize"] += t3 - t2
            if rep == 0:
                if not np.array_equal(arr, loader.load_image(p, cfg)):
                    raise RuntimeError(f"{p}: the staged steps differ from load_image; the bound would lie")
                arrays.append(arr)
    n_decoded = passes * len(paths)
    batcher = Batcher.for_stream(batch_size)  # the policy of `defectscope inspect`
    count = max(inputs, len(arrays))
    items = [Item(str(i), arrays[i % len(arrays)]) for i in range(count)]
    batches = [b for it in items for b in batcher.add(it)] + batcher.drain()
    meta = inspector.metadata
    inspector.predict(inspector.preprocess([arrays[0]]), cam=False)  # warm-up
    buffers: dict[tuple[int, ...], np.ndarray] = {}
    for group in batches:
        images = [it.array for it in group if it.array is not None]
        shape = (len(images), images[0].shape[2], *images[0].shape[:2])
        out = buffers.setdefault(shape, np.empty(shape, np.float32))
        t0 = clock()
        x = loader.normalize_batch(images, meta.mean, meta.std, out=out)
        t1 = clock()
        inspector.predict(x, cam=False)
        spent["normalise"] += t1 - t0
        spent["model"] += clock() - t1
    t0 = clock()
    for a in arrays:
        inspector.predict(loader.normalize_batch([a], meta.mean, meta.std), cam=False)
    batch1_ms = (clock() - t0) / len(arrays) * 1e3
    per = {"read": n_decoded, "decode": n_decoded, "resize": n_decoded, "normalise": count, "model": count}
    ms = {k: v / per[k] * 1e3 for k, v in spent.items()}
    with Image.open(paths[0]) as first:
        decoded_size = list(first.size)
    return {
        "ms": {k: round(v, 4) for k, v in ms.items()},
        "total_ms": round(sum(ms.values()), 4),
        "model_and_normalise_batch1_ms": round(batch1_ms, 4),
        "samples": n_decoded,
        "mean_batch": round(count / len(batches), 2),
        "input_shape": list(arrays[0].shape),
        "decoded_size": decoded_size,
        "downscale": getattr(cfg, "downscale", "exact"),
    }


def decode_many(paths: Sequence[str], cfg: Any) -> list[Any]:
    """One process-pool task: decode ``paths`` with inspect's own per-file step."""
    from defectscope.runtime.pipeline import decode

    return [decode(p, cfg) for p in paths]


def decode_scaling(paths: Sequence[Path], cfg: Any, workers: int, min_samples: int = 48) -> dict[str, Any]:
    """Images/s of decoding alone (read, decode, resize): one thread, ``workers`` threads through
    inspect's own :func:`decode_stream`, and ``workers`` processes (a warm pool, chunks of paths).

    Pillow releases the GIL inside its decoders and resampling, so threads should scale unless the
    Python glue around them dominates; processes pay for pickling every decoded array back.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from defectscope.runtime.pipeline import decode_stream

    names = [str(p) for p in paths] * max(1, math.ceil(min_samples / len(paths)))
    chunk = max(1, len(names) // (8 * workers))
    chunks = [names[i : i + chunk] for i in range(0, len(names), chunk)]
    out: dict[str, Any] = {"workers": workers, "images": len(names)}
    t0 = time.perf_counter()
    decode_many(names, cfg)
    out["one_thread"] = round(len(names) / (time.perf_counter() - t0), 1)
    t0 = time.perf_counter()
    sum(1 for _ in decode_stream(names, cfg, workers, max(2 * workers, 16) + workers))
    out["threads"] = round(len(names) / (time.perf_counter() - t0), 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(decode_many, [names[:1]] * workers, [cfg] * workers))  # start-up left out
        t0 = time.perf_counter()
        sum(len(items) for items in pool.map(decode_many, chunks, [cfg] * len(chunks)))
        out["processes"] = round(len(names) / (time.perf_counter() - t0), 1)
    return out


def naive_loop(listing: Sequence[Path], model: Path) -> float:
    """Images/s of the loop a user writes: loader, numpy normalisation, ``session.run`` at batch 1."""
    import onnxruntime as ort

    from defectscope.runtime import Inspector, load_image

    meta = Inspector(model, provider="cpu", log=lambda _m: None).metadata
    cfg = meta.loader
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    mean, std = np.asarray(meta.mean, np.float32), np.asarray(meta.std, np.float32)

    def one(path: Path) -> None:
        x = (load_image(path, cfg).astype(np.float32) / 255.0 - mean) / std
        session.run(["probs"], {"input": np.ascontiguousarray(x.transpose(2, 0, 1)[None])})

    one(listing[0])  # first-run allocations
    t0 = time.perf_counter()
    for p in listing:
        one(p)
    return len(listing) / (time.perf_counter() - t0)


def _loader_of(model: Path) -> Any:
    from defectscope.runtime import Inspector

    return Inspector(model, provider="cpu", log=lambda _m: None).loader_config


def _inspect(
    case: Case, listing: Path, workdir: Path, env: dict[str, str] | None, extra: Sequence[str]
) -> dict[str, Any]:
    tag = "before" if env else "after"
    out = workdir / "cases" / f"{case.name}-{tag}.jsonl"
    run = run_inspect(case.model, listing, out, ["--provider", "cpu", *extra], env=env)
    if run["exit_code"] != 0 or run["rows"] != case.inputs or not run["in_run_images_per_s"]:
        raise RuntimeError(f"defectscope inspect ({tag}) failed on {case.name}: {run}")
    return {
        "images_per_s": run["in_run_images_per_s"],
        "end_to_end_images_per_s": run["images_per_s"],
        "seconds": round(run["seconds"], 2),
        "peak_rss_mib": run["peak_rss_mib"],
    }


def run_case(
    case: Case,
    workdir: Path,
    cores: int,
    batch_size: int,
    baseline_env: dict[str, str] | None,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Stages, bound, naive loop, inspect (and the baseline's inspect) for one case."""
    stages = stage_costs(case.images, case.model, batch_size, case.inputs)
    bound = cores / (stages["total_ms"] / 1e3)
    listing_paths = list(case.images) * case.repeat
    listing = write_listing(workdir / "lists" / f"case_{case.name}.txt", listing_paths)
    naive = naive_loop(listing_paths, case.model)
    meta_cfg = _loader_of(case.model)
    scaling = decode_scaling(case.images, meta_cfg, cores)
    after = _inspect(case, listing, workdir, None, extra)
    row: dict[str, Any] = {
        "case": case.name,
        "model": case.model.name,
        "inputs": case.inputs,
        "distinct_images": len(case.images),
        "stages": stages,
        "cores": cores,
        "bound_images_per_s": round(bound, 1),
        "naive_images_per_s": round(naive, 1),
        "inspect": after,
        "decode_only_images_per_s": scaling,
        "fraction_of_bound": round(after["images_per_s"] / bound, 3),
        "vs_naive": round(after["images_per_s"] / naive, 3),
    }
    if baseline_env is not None and case.baseline:
        before = _inspect(case, listing, workdir, baseline_env, extra)
        row["before"] = before
        row["before_fraction_of_bound"] = round(before["images_per_s"] / bound, 3)
        row["before_vs_naive"] = round(before["images_per_s"] / naive, 3)
    return row


def camera_cases(
    workdir: Path,
    frames: int,
    size: tuple[int, int],
    seconds: float,
    seed: int,
    kinds: Sequence[str] = CAMERA_KINDS,
) -> list[tuple[Case, float]]:
    """Case (c): each kind under both policies, each with its inputs sized to about ``seconds``."""
    out = []
    for kind in kinds:
        channels = 1 if kind.startswith("grey") else 3
        images = camera_frames(workdir, kind, frames, size)
        for policy in ("exact", "fast"):
            model = small_model(workdir, channels, policy, seed)
            out.append((Case(f"camera-{kind}-{policy}", model, images, baseline=policy == "exact"), seconds))
    return out


def run_cases(
    cases: Sequence[tuple[Case, float]],
    workdir: Path,
    cores: int,
    batch_size: int,
    baseline_env: dict[str, str] | None,
    log: Any = print,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Every case; a case given ``seconds`` > 0 lists its images often enough for about that long."""
    rows = []
    for case, seconds in cases:
        if seconds > 0:  # size the run from a first estimate of the bound
            est = stage_costs(case.images[:2], case.model, batch_size, min_samples=2)
            want = seconds * cores / (est["total_ms"] / 1e3)
            case = Case(
                case.name, case.model, case.images, max(1, round(want / len(case.images))), case.baseline
            )
        log(f"case {case.name}: {case.inputs} inputs")
        rows.append(run_case(case, workdir, cores, batch_size, baseline_env, extra))
    worst_bound = min(rows, key=lambda r: r["fraction_of_bound"])
    worst_naive = min(rows, key=lambda r: r["vs_naive"])
    return {
        "cases": rows,
        "batch_size": batch_size,
        "worst_fraction_of_bound": {"case": worst_bound["case"], "value": worst_bound["fraction_of_bound"]},
        "worst_vs_naive": {"case": worst_naive["case"], "value": worst_naive["vs_naive"]},
        "baseline": bool(baseline_env),
        "inspect_args": ["--provider", "cpu", *extra],
    }
