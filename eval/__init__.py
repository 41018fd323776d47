"""The evaluations. Each runs as a module from the repository root: `python -m eval.length`, `python -m eval.niah`..."""
