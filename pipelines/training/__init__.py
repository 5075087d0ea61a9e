"""Training and calibration: a library layer above the pipelines, below the application.

`linear_ag` (LinearAG's least-squares calibration on full-CFG trajectories), `evaluators` (dynamic guidance's
fidelity discriminator and latent heads, distilled from a pixel evaluator), `self_npo` (the Self-NPO trainer),
`trainer` (the resumable training loop they share) and `shapes` (the shapes world's own models: a development
fixture, built by `python -m pipelines.application.commands.train_shapes`).
"""
