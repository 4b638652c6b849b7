"""Training side: Hydra app, LightningModule, metrics, MLflow tracking, checkpoints.

``defectscope.training.train.train(cfg) -> dict[str, float]`` is the plain function behind
``defectscope train``; ``defectscope.training.app`` holds the Hydra entry points.  Submodules
import torch/Lightning, so import them explicitly (this package file stays light).
"""
