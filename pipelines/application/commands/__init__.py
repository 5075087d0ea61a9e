"""The console commands (`guided-generate`, `guided-edit`, `guided-calibrate-linear-ag`, `guided-train-evaluator`,
`guided-train-npo`; each with `--help`) and the development command that rebuilds the shapes world
(`python -m pipelines.application.commands.train_shapes`)."""
