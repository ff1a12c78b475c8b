"""Layer 2: how one producer -> BatchNorm pair runs in each mode."""
