"""Round-to-nearest: each group's codes from its own min/max (``primitives.fake_quantize``).

Materialized by ``fused.fake_quantize``: the compiled one-pass kernel once it is compiled for a
weight's layout (in a background thread), today's eager formula until then; bit for bit equal.
"""

from __future__ import annotations

import torch

from qviz.quant import fused
from qviz.quant.config import QuantConfig
from qviz.quant.methods import Method


class RTN(Method):
    """No calibration and no settings: the weight alone decides its codes."""

    name = "rtn"

    def quantize_weight(self, w: torch.Tensor, cfg: QuantConfig, name: str) -> torch.Tensor:
        """w [out, in] -> dequantized [out, in], bit for bit ``fake_quantize(w, cfg)``."""
        return fused.fake_quantize(w, cfg, name)
