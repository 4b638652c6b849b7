"""Export: fold BatchNorm, write a parity-checked, self-describing ONNX model, log it to MLflow.

Sub-modules import torch/onnx themselves; importing this package stays cheap.
"""
