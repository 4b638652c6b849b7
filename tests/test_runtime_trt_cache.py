"""The TensorRT engine cache, tested on the CPU (issue 21): keyed by the model's bytes and the profile,
built in a private folder and published atomically between processes, cleaned of outdated engines only.

What a GPU must still confirm is in deploy/gpu_check.sh.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort
import pytest

from defectscope.runtime import cli, watch
from defectscope.runtime.inspector import file_sha256
from defectscope.runtime.trt import (
    TRT_MAX_BATCH,
    EngineCache,
    TrtProfile,
    clean_engine_cache,
    engine_folder,
    trt_options,
)
from onnx_models import build_model, make_image

# -- 1. the engine cache key -----------------------------------------------------------------------


def test_engine_folder_is_keyed_by_the_models_bytes_not_its_name(tmp_path: Path) -> None:
    profile = TrtProfile(TRT_MAX_BATCH, 1, 32, 512)
    first = file_sha256(build_model(tmp_path / "line3.onnx", seed=0))
    second = file_sha256(build_model(tmp_path / "line3.onnx", seed=1))  # re-exported under the same name
    root = tmp_path / "cache"
    a = engine_folder(root, first, profile, False, ort.__version__)
    assert a != engine_folder(root, second, profile, False, ort.__version__)
    assert a.parent.name == first[:16] and a.parent.parent == root
    assert a == engine_folder(root, first, profile, False, ort.__version__)
    # precision, profile and ORT version change the engine, so each gets its own folder
    assert a != engine_folder(root, first, profile, True, ort.__version__)
    assert a != engine_folder(root, first, TrtProfile(8, 1, 32, 512), False, ort.__version__)
    assert a != engine_folder(root, first, profile, False, "0.0.0")


def test_profile_does_not_depend_on_the_commands_batch_size() -> None:
    # inspect and watch open the session from the same options, whatever batch size each command runs
    args = {"model": "m.onnx", "provider": "auto", "threads": None, "graph_opt": "all", "trt_cache": None}
    ins = cli.build_parser().parse_args(["m.onnx", "x.png", "-o", "r.jsonl"])
    wat = watch.build_parser().parse_args(["m.onnx", "--in", "hot", "--out", "out", "--batch-size", "4"])
    assert ins.batch_size != wat.batch_size
    for ns in (ins, wat):
        assert {k: getattr(ns, k) for k in args} == args
        assert (ns.trt_max_batch, ns.trt_max_side, ns.trt_cache_clean) == (TRT_MAX_BATCH, None, False)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["m.onnx", "x.png", "-o", "r.jsonl", "--trt-max-side", "0"])


def test_trt_provider_options_carry_the_profile_and_the_private_folder(tmp_path: Path) -> None:
    opts = trt_options(TrtProfile(16, 3, 32, 640), tmp_path, fp16=True)
    assert opts["trt_profile_min_shapes"] == "input:1x3x32x32"
    assert opts["trt_profile_opt_shapes"] == opts["trt_profile_max_shapes"] == "input:16x3x640x640"
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(tmp_path)
    assert opts["trt_fp16_enable"] == "True" and opts["trt_engine_cache_enable"] == "True"
    assert trt_options(TrtProfile(16, 3, 32, 640), tmp_path, fp16=False)["trt_fp16_enable"] == "False"


def _write_engine(folder: Path, name: str, payload: bytes) -> None:
    """What ORT does after a build: write (or overwrite) engine files in its cache folder."""
    (folder / name).write_bytes(payload)


def test_engine_cache_builds_privately_and_publishes_only_what_changed(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "0123456789abcdef" / "ort1-b16-c1-32-512-fp32"
    first = EngineCache(folder)
    work = first.open()
    assert work.parent == folder.parent and work.name.startswith(".run-") and not first.published
    _write_engine(work, "TensorrtExecutionProvider_x.engine", b"E1" * 1000)
    _write_engine(work, "TensorrtExecutionProvider_x.profile", b"P1")
    assert first.publish() == 2 and first.published
    assert (folder / "TensorrtExecutionProvider_x.engine").read_bytes() == b"E1" * 1000
    first.discard()
    assert not work.exists()

    second = EngineCache(folder)
    work2 = second.open()  # seeded with the published engine: ORT finds it and builds nothing
    assert (work2 / "TensorrtExecutionProvider_x.engine").read_bytes() == b"E1" * 1000
    assert second.publish() == 0  # nothing new
    time.sleep(0.01)
    _write_engine(work2, "TensorrtExecutionProvider_x.engine", b"E2" * 1000)  # a rebuild
    assert second.publish() == 1
    assert (folder / "TensorrtExecutionProvider_x.engine").read_bytes() == b"E2" * 1000
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    second.discard()


WRITER = """
import hashlib, os, sys
from pathlib import Path
from defectscope.runtime.trt import EngineCache
folder, tag, rounds = Path(sys.argv[1]), sys.argv[2].encode(), int(sys.argv[3])
for i in range(rounds):
    cache = EngineCache(folder)
    work = cache.open()
    body = (tag + str(i).encode()) * 200_000
    (work / "TensorrtExecutionProvider_m.engine").write_bytes(hashlib.sha256(body).digest() + body)
    cache.publish()
    cache.discard()
"""


@pytest.mark.slow
def test_two_processes_sharing_the_cache_never_expose_a_half_written_engine(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "0123456789abcdef" / "ort1-b16-c1-32-512-fp32"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(folder), tag, "25"], env=env)
        for tag in ("A", "B")
    ]
    engine = folder / "TensorrtExecutionProvider_m.engine"
    checked = 0
    while any(w.poll() is None for w in writers):
        if engine.is_file():
            data = engine.read_bytes()
            assert hashlib.sha256(data[32:]).digest() == data[:32], "a reader saw a partial engine"
            checked += 1
    assert all(w.returncode == 0 for w in writers)
    data = engine.read_bytes()
    assert hashlib.sha256(data[32:]).digest() == data[:32]
    assert checked > 0
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".run-")]  # private copies gone


def test_clean_removes_only_outdated_engines_it_created(tmp_path: Path) -> None:
    root = tmp_path / "trt"
    keep = root / "0123456789abcdef" / "ort1.32.0-b16-c1-32-512-fp32"
    other_setting = root / "0123456789abcdef" / "ort1.31.0-b16-c1-32-512-fp32"
    other_model = root / "fedcba9876543210" / "ort1.32.0-b16-c1-32-512-fp16"
    stale_run, fresh_run = keep.parent / ".run-1-old", keep.parent / ".run-2-new"
    for d in (keep, other_setting, other_model, stale_run, fresh_run, root / "photos"):
        d.mkdir(parents=True)
        (d / "TensorrtExecutionProvider_x.engine").write_bytes(b"x" * 100)
    os.utime(stale_run, (time.time() - 7200, time.time() - 7200))
    (root / "TensorrtExecutionProvider_legacy.engine").write_bytes(b"y" * 50)  # the old flat layout
    (root / "notes.txt").write_text("mine")
    removed, freed = clean_engine_cache(root, keep=keep)
    assert (removed, freed) == (4, 350)
    left = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir() or p.suffix == ".txt"}
    assert left == {
        "0123456789abcdef", keep.relative_to(root).as_posix(), fresh_run.relative_to(root).as_posix(),
        "photos", "notes.txt",
    }  # fmt: skip
    assert clean_engine_cache(tmp_path / "missing") == (0, 0)


def test_a_cache_folder_that_cannot_be_one_is_refused_on_any_provider(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--trt-cache naming a file was ignored on a CPU test PC and refused only on the line PC's TensorRT start;
    inspect and watch now tell it before any image, whatever the provider. A folder to be made is fine."""
    model = build_model(tmp_path / "m.onnx")
    image = make_image(tmp_path / "x.png", 64, 64, bright=False)
    for main, args in (
        (cli.main, [str(model), str(image), "-o", str(tmp_path / "r.jsonl")]),
        (watch.main, [str(model), "--in", str(tmp_path / "hot"), "--out", str(tmp_path / "out")]),
    ):
        assert main([*args, "--provider", "cpu", "--trt-cache", str(model)]) == 2
        assert f"--trt-cache {model}: is a file, not a folder" in capsys.readouterr().err
    assert (
        cli.main(
            [str(model), str(image), "-o", str(tmp_path / "r.jsonl"), "--trt-cache", str(tmp_path / "new")]
        )
        == 0
    )
    assert not (tmp_path / "new").exists()  # unused on the CPU: not made
