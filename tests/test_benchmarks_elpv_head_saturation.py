"""benchmarks/elpv_head_saturation.py: the shares of a head's ReLU6 activations at the cap, on a hand-made map."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def head_saturation() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling modules by name
    return importlib.import_module("elpv_head_saturation")


def test_saturation_shares_on_a_hand_made_map(head_saturation: ModuleType) -> None:
    """4 channels on a 2 x 2 map: channel 0 capped at one position, channel 1 at two (one of them the same
    position), the rest below the cap (5.9 is not capped)."""
    out = torch.full((4, 2, 2), 1.0)
    out[0, 0, 0] = 6.0
    out[1, 0, 0] = 6.0
    out[1, 1, 1] = 6.0
    out[2, 0, 1] = 5.9
    shares = head_saturation.saturation(out)
    assert shares["activations"] == pytest.approx(3 / 16)
    assert shares["channels_at_busiest_position"] == pytest.approx(2 / 4)  # position (0, 0)
    assert shares["channels_capped_anywhere"] == pytest.approx(2 / 4)
