"""Layer 3: finding producer -> BatchNorm pairs in a model, converting and restoring it."""
