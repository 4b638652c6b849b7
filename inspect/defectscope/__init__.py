"""defectscope: train GAP CNN defect classifiers, export self-describing ONNX, inspect on line PCs.

Importing this package never imports torch; the training side lives in sub-packages that do.
"""

__version__ = "0.1.0"
