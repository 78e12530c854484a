"""cfga: exact, batched CFGA feature extraction and retrieval metrics (Yu et al., PR 149, 2024)."""
from .extract import extract_features
from .models import load_model

__version__ = "0.1.0"
__all__ = ["load_model", "extract_features", "__version__"]
