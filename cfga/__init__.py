"""cfga: exact, batched CFGA feature extraction and retrieval metrics (Yu et al., PR 149, 2024)."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_model", "extract_features", "__version__"]


def __getattr__(name):
    # Lazy: `import cfga.numerics.metrics` (one process per table cell) must not pay for torchvision.
    if name == "load_model":
        from cfga.checkpoints.load import load_model

        return load_model
    if name == "extract_features":
        from cfga.extraction.pipeline import extract_features

        return extract_features
    raise AttributeError(f"module 'cfga' has no attribute {name!r}")
