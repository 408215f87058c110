"""Dialbox's stages (`python -m pipeline.<stage>`): thin Hydra apps over the library packages below
them (activations/, sae/, features/, steering/), plus what only the stages share: the typed configs
(config.py), one-line errors (cli.py), the generated configuration reference (docs.py) and the
benchmarks (bench/)."""
