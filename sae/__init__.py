"""Sparse autoencoders: sae-lens architectures, the fast TopK step, the training loop, metrics."""
