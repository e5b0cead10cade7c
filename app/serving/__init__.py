"""Serving one image: the prediction step, micro-batching, admission control, service state."""
