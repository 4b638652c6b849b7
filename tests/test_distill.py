"""Distillation (``distill.*``): the student learns what the teacher model file says, not the labels,
in the share the config gives; the loss is the softened KL; wrong settings stop the run in one line."""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from defectscope.training.config import TrainingConfigError
from defectscope.training.distill import distill_loss
from defectscope.training.distill_settings import distill_settings
from defectscope.training.train import train
from tiny_runs import tiny_folder_overrides
from trust_files import cli


def make_set(root: Path, per_class: int = 48, size: int = 48, seed: int = 0) -> Path:
    """Grey noise; the ``crack`` images carry a bright bar."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in ("crack", "good"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(90, 12, (size, size))
            if name == "crack":
                y = int(rng.integers(4, size - 8))
                img[y : y + 4, 6:-6] += 100
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / name / f"{name}{i:03d}.png")
    return root


def swapped_copy(src: Path, dst: Path) -> Path:
    """The same images with the labels the other way round (the bars now in ``good``)."""
    for a, b in (("crack", "good"), ("good", "crack")):
        shutil.copytree(src / a, dst / b)
    return dst


def cfg_for(
    compose_train: Callable[..., Any], data: Path, out: Path, *extra: str, logger: str = "none"
) -> Any:
    base = tiny_folder_overrides(data, out, "good", epochs=8, logger=logger)
    return compose_train([*base, "shift_consistency.copies=0", *extra])


@pytest.fixture(scope="module")
def teacher(
    tmp_path_factory: pytest.TempPathFactory, compose_train: Callable[..., Any]
) -> tuple[Path, Path, float]:
    """(teacher .onnx, its data, its test accuracy there): a tiny model that finds the bars."""
    from defectscope.checkpoint import load_checkpoint
    from defectscope.export.onnx_export import export_model

    data = make_set(tmp_path_factory.mktemp("bars"))
    out = tmp_path_factory.mktemp("teacher-run")
    metrics = train(cfg_for(compose_train, data, out))
    model, info = load_checkpoint(out / "checkpoints" / "best.ckpt")
    onnx = export_model(model, info, out / "teacher.onnx", log=lambda _: None).path
    return Path(onnx), data, float(metrics["test/acc"])


@pytest.mark.slow
def test_the_student_follows_the_teacher_in_the_share_it_is_given(
    teacher: tuple[Path, Path, float], tmp_path: Path, compose_train: Callable[..., Any]
) -> None:
    """On images labelled the other way round, a student with weight 1 learns the teacher's ranking
    (AUROC against the labels near 0: every crack scored below every good image); with weight 0.2 the
    labels win again."""
    onnx, data, teacher_acc = teacher
    assert teacher_acc >= 0.9
    swapped = swapped_copy(data, tmp_path / "swapped")
    follows = train(
        cfg_for(compose_train, swapped, tmp_path / "w1", f"distill.teacher={onnx}", "distill.weight=1.0")
    )
    assert follows["test/auroc"] <= 0.05
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mostly_labels = train(
        cfg_for(
            compose_train, swapped, tmp_path / "w02", f"distill.teacher={onnx}", "distill.weight=0.2",
            f"logger.tracking_uri={store}", "logger.experiment_name=distill", logger="mlflow",
        )
    )  # fmt: skip
    assert mostly_labels["test/auroc"] >= 0.95 and mostly_labels["test/acc"] >= 0.85

    from mlflow.tracking import MlflowClient

    from defectscope.runtime.files import file_sha256

    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("distill")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["distill.teacher_sha256"] == file_sha256(onnx)  # what the run was trained towards
    assert float(run.data.tags["distill.teacher_agreement"]) <= 0.05  # the labels are the other way round
    assert run.data.params["distill.teacher"] == str(onnx)
    # the artifacts sit beside the store, not in ./mlruns of the folder pytest runs in (the checkout)
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert (
        artifacts.is_relative_to(tmp_path / "mlruns") and (artifacts / "checkpoints" / "best.ckpt").is_file()
    )


def test_the_loss_is_the_softened_kl() -> None:
    """Hand-computed: T^2 * sum q_T (log q_T - log p_T) with p_T ∝ p^(1/T); zero when they agree."""
    student = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    teacher = torch.tensor([[0.5, 0.3, 0.2]])
    t = 2.0
    p = np.array([0.7, 0.2, 0.1]) ** (1 / t)
    q = np.array([0.5, 0.3, 0.2]) ** (1 / t)
    p, q = p / p.sum(), q / q.sum()
    expected = t * t * float(np.sum(q * (np.log(q) - np.log(p))))
    assert math.isclose(float(distill_loss(student, teacher, t)), expected, rel_tol=1e-5)
    assert float(distill_loss(torch.log(teacher), teacher, 3.0)) == pytest.approx(0.0, abs=1e-6)
    batch = distill_loss(torch.cat([student, torch.log(teacher)]), torch.cat([teacher, teacher]), t)
    assert math.isclose(float(batch), expected / 2, rel_tol=1e-5)  # mean over the batch


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"teacher": None, "weight": 0}, "distill.weight must be a number in (0, 1], got 0"),
        ({"teacher": None, "weight": 1.5}, "distill.weight must be a number in (0, 1], got 1.5"),
        ({"teacher": None, "temperature": "hot"}, "distill.temperature must be a number > 0, got 'hot'"),
        (
            {"teacher": None, "temp": 2},
            "distill.temp is not a setting; distill takes teacher, weight and temperature",
        ),
        ({"teacher": 3}, "distill.teacher must be the path of an exported model (.onnx), got 3"),
        (
            {"teacher": "missing.onnx"},
            "distill.teacher: missing.onnx: model file not found; expected an exported model (.onnx), written by "
            "defectscope export CHECKPOINT --tta dihedral -o teacher.onnx",
        ),
        (
            "teacher.onnx",
            "distill must be a group of teacher, weight and temperature (distill.teacher=model.onnx), got 'teacher.onnx'",
        ),
        ({"teacher": "."}, "distill.teacher: . is a folder; expected the exported model file (.onnx)"),
    ],
)
def test_settings_are_checked_with_the_key_named(spec: Any, says: str) -> None:
    with pytest.raises(TrainingConfigError) as err:
        distill_settings(spec)
    assert str(err.value) == says


def test_a_checkpoint_is_no_teacher(tmp_path: Path) -> None:
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(TrainingConfigError) as err:
        distill_settings({"teacher": str(ckpt)})
    assert str(err.value) == (
        f"distill.teacher: {ckpt} is a training checkpoint, not an exported model; export it first: "
        f"defectscope export {ckpt} --tta dihedral -o teacher.onnx"
    )
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(
        TrainingConfigError,
        match=r"^distill\.teacher: .*empty\.onnx is empty \(0 bytes\); copy the model again",
    ):
        distill_settings({"teacher": str(tmp_path / "empty.onnx")})


@pytest.mark.slow
def test_a_teacher_of_other_classes_stops_the_run_in_one_line(
    teacher: tuple[Path, Path, float], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """The teacher grades crack/good; a data set of other classes is refused before training."""
    onnx, data, _ = teacher
    other = tmp_path / "other"
    shutil.copytree(data / "crack", other / "scratch")
    shutil.copytree(data / "good", other / "good")
    proc = cli(
        [
            "train", "data=folder", "model=tiny", "logger=none", "trainer.max_epochs=1", "threads=1",
            f"data.source.root={other}", "data.source.good_class=good", "data.num_workers=0",
            "data.persistent_workers=false", f"distill.teacher={onnx}", f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path, cli_env,
    )  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("defectscope train: error: distill.teacher: ") and "crack, good" in last, (
        proc.stderr
    )
    assert "scratch, good" in last or "good, scratch" in last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_ddp_ranks_read_their_own_images_teacher_rows(
    teacher: tuple[Path, Path, float], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """Two CPU processes (gloo), each with its own shard of the training split: a weight-1 student on the
    swapped labels still learns the teacher's ranking, so every rank looked up its own images' rows."""

    onnx, data, _ = teacher
    swapped = swapped_copy(data, tmp_path / "swapped")
    overrides = tiny_folder_overrides(swapped, tmp_path / "out", "good", epochs=8)
    proc = cli(
        [
            "train", *overrides, "trainer=ddp", "trainer.accelerator=cpu", "shift_consistency.copies=0",
            f"distill.teacher={onnx}", "distill.weight=1.0", f"hydra.run.dir={tmp_path / 'out'}",
        ],
        tmp_path, cli_env,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Starting with 2 processes" in log
    shares = {int(rank): int(n) for n, rank in re.findall(
        r"scored (\d+) of the \d+ training images in this process \(rank (\d) of 2\)", log
    )}  # fmt: skip
    total = int(re.findall(r"scored \d+ of the (\d+) training images", log)[0])
    assert set(shares) == {0, 1} and sum(shares.values()) == total  # each rank its half, not the whole split
    where = re.findall(r"in this process \(rank \d of 2\) on (.+?) in \d+ s", log)
    assert where == ["the CPU", "the CPU"]  # CPU processes: no GPU session, whatever this ORT build has
    auroc = re.search(r"test \(best\):.* auroc=([0-9.]+)", proc.stdout)
    assert auroc is not None, proc.stdout[-2000:]
    assert float(auroc.group(1)) <= 0.05


@pytest.mark.slow
def test_a_resumed_run_keeps_its_teacher(
    teacher: tuple[Path, Path, float], tmp_path: Path, compose_train: Callable[..., Any]
) -> None:
    """Resuming continues the objective the run started with: other distill settings are one line, and so
    is a teacher file replaced under the same path (the checkpoint keeps the teacher's sha256)."""
    import onnx as onnx_lib

    from defectscope.checkpoint import read_info
    from defectscope.runtime.files import file_sha256
    from defectscope.training.distill_settings import DistillSettings
    from defectscope.training.resume import read_resume

    onnx = tmp_path / "teacher.onnx"
    shutil.copyfile(teacher[0], onnx)
    data = teacher[1]
    out = tmp_path / "run"
    train(cfg_for(compose_train, data, out, f"distill.teacher={onnx}", "trainer.max_epochs=1", "test=false"))
    last = str(out / "checkpoints" / "last.ckpt")
    assert (
        read_resume(last, None, DistillSettings(str(onnx), 0.5, 2.0))["model_name"] == "gapcnn"
    )  # model=tiny
    with pytest.raises(TrainingConfigError) as err:
        read_resume(last, None, DistillSettings(str(onnx), 1.0, 2.0))
    assert str(err.value) == (
        f"distill.* give teacher {onnx}, weight 1, temperature 2 but {last} was trained with teacher {onnx}, "
        "weight 0.5, temperature 2: a resumed run keeps its objective; resume with the checkpoint's distill "
        "settings or start a new run"
    )
    with pytest.raises(
        TrainingConfigError, match=r"^distill\.\* give no teacher but .* was trained with teacher "
    ):
        train(cfg_for(compose_train, data, out, f"ckpt_path={last}", "trainer.max_epochs=2"))
    assert read_info(last)[1]["teacher_sha256"] == file_sha256(onnx)
    replaced = onnx_lib.load(str(onnx))
    replaced.doc_string = "another teacher"
    onnx_lib.save(replaced, str(onnx))
    with pytest.raises(TrainingConfigError) as err:
        train(
            cfg_for(
                compose_train,
                data,
                out,
                f"distill.teacher={onnx}",
                f"ckpt_path={last}",
                "trainer.max_epochs=2",
            )
        )
    assert re.fullmatch(
        rf"distill\.teacher: {re.escape(str(onnx))} is not the file {re.escape(last)} was trained towards "
        r"\(sha256 [0-9a-f]{12}…, the run's teacher [0-9a-f]{12}…\): a resumed run keeps its objective; "
        r"put that teacher file back or start a new run",
        str(err.value),
    )


@pytest.mark.slow
def test_an_image_one_ddp_rank_cannot_teach_stops_every_rank_in_one_line(
    tmp_path: Path, compose_train: Callable[..., Any], cli_env: dict[str, str]
) -> None:
    """One training image that the teacher's loader refuses (smaller than its min_size) lies in one rank's
    share only: that rank's error reaches the other through the gathered rows, so both stop, nobody waits."""
    from PIL import Image

    from defectscope.checkpoint import load_checkpoint
    from defectscope.export.onnx_export import export_model

    data = make_set(tmp_path / "bars", per_class=24)
    run = tmp_path / "teacher-run"
    train(cfg_for(compose_train, data, run, "data.loader.min_size=44", "trainer.max_epochs=1", "test=false"))
    model, info = load_checkpoint(run / "checkpoints" / "last.ckpt")
    onnx = export_model(model, info, tmp_path / "teacher.onnx", log=lambda _: None).path
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(data / "good" / "good900.png")
    overrides = tiny_folder_overrides(data, tmp_path / "out", "good", epochs=1)
    proc = cli(
        [
            "train", *overrides, "trainer=ddp", "trainer.accelerator=cpu", "shift_consistency.copies=0",
            f"distill.teacher={onnx}", f"hydra.run.dir={tmp_path / 'out'}",
        ],
        tmp_path, cli_env,
    )  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"defectscope train: error: distill\.teacher: the teacher cannot read the training image "
        rf"{re.escape(str(data / 'good' / 'good900.png'))} under its own loader: .*40.*",
        last,
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_each_training_process_gives_the_teacher_its_own_gpu() -> None:
    """A DDP process on cuda:1 runs its teacher pass on GPU 1 (not every rank on GPU 0) where ONNX Runtime
    has CUDA; a CPU process, or an ORT build without CUDA, runs it on the CPU."""
    import onnxruntime as ort

    from defectscope.training.distill import teacher_gpu

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert teacher_gpu(torch.device("cpu")) is None
    assert teacher_gpu(torch.device("cuda", 1)) == (1 if has_cuda else None)
