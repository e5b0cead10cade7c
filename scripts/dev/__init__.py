"""Tools for developers: the measurements in docs/PERFORMANCE.md (benchmark, load generator, fuzzer,
settings and model comparisons, decode times, drift replay) and the generated docs (configuration
reference, explanation figure). Run from the project root: `python -m scripts.dev.benchmark`."""
