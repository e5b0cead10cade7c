"""What CI runs beyond the test suite (`.ci/run`): the container smoke test, the replicas together,
the Kubernetes manifests, as shell drivers, and their Python as modules of this package (checked by
ruff and `mypy --strict scripts/ci`), each run as `python -m scripts.ci.<name>` from the project
root, or by path where it runs inside an image."""
