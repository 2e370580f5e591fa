"""Round-to-nearest: each group's codes from its own min/max (``primitives.fake_quantize``).

Materialized by ``fused.fake_quantize``: the compiled one-pass kernel once it is compiled for a
weight's layout (in a background thread), today's eager formula until then; bit for bit equal.
On a GPU, the weights of one shape and config (the 30 ``q_proj`` and ``o_proj`` of SmolLM2, say)
are quantized as one stacked tensor: groups run along rows, so stacking rows changes no result,
and a model's 210 Linears cost a handful of kernel launches instead of 210 (or ~1,700 eager).
"""

from __future__ import annotations

import torch

from qviz.quant import fused
from qviz.quant.config import QuantConfig
from qviz.quant.methods import Method, Request, apply


def stacks_on(device: torch.device) -> bool:
    """Whether same-shaped weights on ``device`` are quantized as one stacked tensor: on a GPU,
    where a kernel launch costs more than the arithmetic of a 576-wide weight; not on the CPU,
    where the stacking copy costs more than the calls it saves."""
    return device.type != "cpu"


class RTN(Method):
    """No calibration and no settings: the weight alone decides its codes."""

    name = "rtn"

    def quantize_weight(self, w: torch.Tensor, cfg: QuantConfig, name: str) -> torch.Tensor:
        """w [out, in] -> dequantized [out, in], bit for bit ``fake_quantize(w, cfg)``."""
        return fused.fake_quantize(w, cfg, name)

    def materialize(self, req: Request) -> dict[str, torch.Tensor]:
        """{name: dequantized weight}; weights of one (shape, dtype, device, config) stacked into
        one [n * out, in] tensor where ``stacks_on`` their device (each result a row slice of
        it), every other weight on its own. Equal bit for bit to one weight at a time."""
        out: dict[str, torch.Tensor] = {}
        stacks: dict[tuple, list] = {}
        for t, cfg, w in req.items:
            if t.layout == "out_in" and stacks_on(w.device):
                stacks.setdefault((tuple(w.shape), w.dtype, w.device, cfg), []).append((t, w))
            else:
                out[t.name] = apply(self, w, t.layout, cfg, t.name)
        for (shape, _, _, cfg), members in stacks.items():
            if len(members) == 1:
                t, w = members[0]
                out[t.name] = self.quantize_weight(w, cfg, t.name)
                continue
            q = self.quantize_weight(torch.cat([w for _, w in members]), cfg, members[0][0].name)
            parts = q.split(shape[0])
            out.update({t.name: part for (t, _), part in zip(members, parts, strict=True)})
        return {t.name: out[t.name] for t, _, _ in req.items}
