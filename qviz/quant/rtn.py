"""Round-to-nearest: each group's codes from its own min/max (``primitives.fake_quantize``)."""

from __future__ import annotations

import torch

from qviz.quant.config import QuantConfig
from qviz.quant.methods import Method
from qviz.quant.primitives import fake_quantize


class RTN(Method):
    """No calibration and no settings: the weight alone decides its codes."""

    name = "rtn"

    def quantize_weight(self, w: torch.Tensor, cfg: QuantConfig, name: str) -> torch.Tensor:
        """w [out, in] -> dequantized [out, in], bit for bit ``fake_quantize(w, cfg)``."""
        return fake_quantize(w, cfg, name)
