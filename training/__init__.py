"""Offline training pipeline: data, patient-level splits, Keras models, evaluation, ONNX export.

Everything here may import TensorFlow; the serving package `app` never does. The only thing that
passes from here to the service is the artifact written to `models/` (ONNX + metadata JSON).
"""

import os

# TensorFlow's C++ INFO/WARNING lines (oneDNN, CUDA probing on CPU-only machines) drown the
# progress output; errors still show. Set before any submodule imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
