"""Layer 1: tensor-level folding arithmetic and the Tune-mode autograd function."""
