"""Dialbox's stages (`python -m pipeline.<stage>`) and what they share: model adapters and hook
sites, the activation store, the run directory, the typed configs."""
