"""Side-by-side measurement scripts: `python -m benchmarks.<name>` from the repository root; each writes its
results files to benchmarks/results/ (see benchmarks/README.md)."""
