"""Model loading and architecture adapters."""

from qviz.models.arch import ADAPTERS, Adapter, get_adapter
from qviz.models.load import EMBEDDED_NAME, ModelNotAvailableError, cache_dir, load_model

__all__ = [
    "ADAPTERS",
    "Adapter",
    "EMBEDDED_NAME",
    "ModelNotAvailableError",
    "cache_dir",
    "get_adapter",
    "load_model",
]
