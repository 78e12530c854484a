"""Facts every layer reads, in one place each: features, protocols, losses, dataset formats. Pure Python (no torch)."""
