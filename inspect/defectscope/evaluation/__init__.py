"""Evaluation shared by training, export and the ``evaluate`` command (numpy only, torch-free).

:mod:`.metrics` holds every figure a model is judged by (the OK/NG threshold choice, escape and
false-reject rates, confusion matrix, per-class precision/recall, ROC/PR), once, for the PyTorch
and the ONNX paths alike.
"""
