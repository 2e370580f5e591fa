"""qviz: see how post-training weight quantization breaks a language model from the inside."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

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
from qviz.studies import frontier as _frontier

if TYPE_CHECKING:
    import pandas as pd

__version__ = "0.1.0"


def memory_frontier(models: Sequence[str | Lab], plans: Sequence[QuantPlan], **kw) -> pd.DataFrame:
    kw.setdefault("load", Lab.load)  # the study sits below the Lab: it is handed the loader
    return _frontier.memory_frontier(models, plans, **kw)


memory_frontier.__doc__ = _frontier.memory_frontier.__doc__


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
    "memory_frontier",
    "quantize",
    "quantized",
]
