"""Model loading and architecture adapters."""

from qviz.models.arch import ADAPTERS, Adapter, get_adapter
from qviz.models.load import (
    EMBEDDED,
    EMBEDDED_NAME,
    ModelNotAvailableError,
    cache_dir,
    ensure_embedded,
    load_model,
)

__all__ = [
    "ADAPTERS",
    "Adapter",
    "EMBEDDED",
    "EMBEDDED_NAME",
    "ModelNotAvailableError",
    "cache_dir",
    "ensure_embedded",
    "get_adapter",
    "load_model",
]
