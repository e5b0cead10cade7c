"""Operations: structured logs and request context, Prometheus metrics, process memory."""
