"""Steering: interventions by feature ID or named vector, the Steerer that generates under them,
contrastive vectors, exports (native, ds4, GGUF), the steering evaluation and the server.

Imports from `activations`, `sae` and `features`; never from `pipeline`."""
