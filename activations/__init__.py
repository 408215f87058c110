"""Activation plumbing, the foundation every other package stands on: models and their
adapters, sites, the corpus, the memory check, the run directory and the activation store.

Imports nothing from `sae`, `features`, `steering` or `pipeline`."""
