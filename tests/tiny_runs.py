"""Hydra overrides for a short, quiet training of the tiny model on a folder of images (shared by the
training tests that build their own small data sets)."""

from __future__ import annotations

from pathlib import Path


def tiny_folder_overrides(
    data: Path, out: Path, good_class: str, epochs: int, logger: str = "none"
) -> list[str]:
    """One process, one thread, no sanity check, no progress bar; outputs under ``out``."""
    return [
        "data=folder", "model=tiny", "callbacks=minimal", f"logger={logger}",
        f"data.source.root={data}", f"data.source.good_class={good_class}", "data.loader.size_multiple=16",
        "data.num_workers=0", "data.persistent_workers=false", "data.batch_size=16", "data.scan_workers=1",
        "threads=1", "trainer.accelerator=cpu", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"trainer.max_epochs={epochs}",
        "optim.optimizer.lr=0.01", f"paths.output_dir={out}", "paths.launch_dir=.", f"paths.data_dir={data}",
    ]  # fmt: skip
