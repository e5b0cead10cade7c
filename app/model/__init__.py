"""The ONNX model as served: the start-up gate that validates it, the classifier, explanations."""
