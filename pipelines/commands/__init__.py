"""Console commands above the pipelines: generate, calibrate LinearAG, train the evaluators of dynamic guidance,
train the shapes world. Each has `--help`; `pyproject.toml` installs them as `guided-*` entry points."""
