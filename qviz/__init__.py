"""qviz: see how post-training weight quantization breaks a language model from the inside."""

from qviz import metrics
from qviz.lab import Lab
from qviz.models import load_model
from qviz.quant import (
    QTensor,
    QuantConfig,
    QuantPlan,
    dequantize,
    footprint,
    quantize,
    quantized,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    """``qviz.views`` and ``qviz.widgets`` import Panel/ipywidgets on first use only."""
    if name in ("views", "widgets", "app"):
        import importlib

        return importlib.import_module(f"qviz.{name}")
    raise AttributeError(f"module 'qviz' has no attribute {name!r}")


__all__ = [
    "metrics",
    "Lab",
    "QTensor",
    "QuantConfig",
    "QuantPlan",
    "dequantize",
    "footprint",
    "load_model",
    "quantize",
    "quantized",
]
