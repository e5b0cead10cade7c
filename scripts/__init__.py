"""The project's scripts, by who runs them: the README's commands at the top of `scripts/`, what CI
runs in `scripts/ci/`, the measurement tools beside them. The Python among them runs from the
project root as modules (`python -m scripts.ci.replicas ...`), importing `app` without path
edits."""
