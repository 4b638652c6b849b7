"""Shared fixtures (kept small: several parts of the suite use this file).

Training tests: ``smoke_data_dir`` generates the smoke experiment's synthetic images ONCE per session
(through the real DataModule), so every training test, in-process or subprocess, reuses them via
``paths.data_dir=...``; ``compose_train`` composes conf/train.yaml with Hydra's compose API.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="session")
def defectscope_cmd() -> list[str]:
    """The CLI as a subprocess command (same interpreter as the tests)."""
    return [sys.executable, "-m", "defectscope"]


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: no inherited tracking URI, no Hydra full traces."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def compose_train() -> Callable[..., object]:
    """``compose_train(overrides, config_name="train")`` -> DictConfig (no Hydra runtime needed)."""
    from hydra import compose, initialize_config_dir

    def compose_(overrides: Sequence[str] = (), config_name: str = "train") -> object:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))

    return compose_


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory: pytest.TempPathFactory, compose_train: Callable[..., object]) -> Path:
    """``paths.data_dir`` holding experiment=smoke's synthetic set, generated once per session."""
    from hydra.utils import instantiate

    data_dir = tmp_path_factory.mktemp("smoke-data")
    cfg = compose_train(
        [
            "experiment=smoke",
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={data_dir}",
            "paths.launch_dir=.",
        ]
    )
    instantiate(cfg.data).prepare_data()  # type: ignore[attr-defined]
    return data_dir
