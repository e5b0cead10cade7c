"""Offline training pipeline: data, patient-level splits, Keras models, evaluation, ONNX export.

Everything here may import TensorFlow; the serving package `app` never does. The only thing that
passes from here to the service is the artifact written to `models/` (ONNX + metadata JSON).
"""
