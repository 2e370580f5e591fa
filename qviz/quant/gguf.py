"""GGUF formats (llama.cpp): each Linear encoded to a GGUF type's bytes and decoded by ``gguf``.

``QuantConfig(4, None, method="gguf", type="Q4_K")``: the type fixes the block layout, so the
config's group size and symmetry are ignored; ``bits`` must be the type's nominal bits (Q4_K:
4), and ``type`` defaults to the k-quant of ``bits`` (8: Q8_0, 6: Q6_K, 5: Q5_K, 4: Q4_K,
3: Q3_K, 2: Q2_K). Encoding: ``gguf.quants.quantize`` (numpy) for the legacy types, the ports of
llama.cpp's reference quantizers in ``kquants`` for k-quants and IQ4_NL; decoding always
``gguf.quants.dequantize``.

Setting ``imatrix=True`` (spelling ``gguf:Q2_K+imatrix``, label ``-im``): the types of
``IMATRIX_TYPES`` weight their rounding error by llama.cpp's importance matrix (each input
column's mean squared activation), computed once per model on the calibration part of the
bundled prose only (``qviz.data.split_text``: its first third, never the evaluation text) and
kept in memory. Rows that fall back to a type without one (Q4_K -> Q5_0 on 576-wide rows) are
quantized as without it; Q2_K's fallback IQ4_NL uses it, as in llama.cpp. Measured on
SmolLM2-135M (4000 held-out characters of the prose's evaluation part, fp 24.2): perplexity
Q2_K 154 -> 35.8 with it, IQ4_NL 29.4 -> 25.7.

A row width that is not a multiple of the type's block (SmolLM2's 576-wide Linears for the
256-wide k-quants) gets llama.cpp's fallback type (``llama-quant.cpp``: Q2_K/Q3_K -> IQ4_NL,
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 if that does not fit either), as
``llama-quantize`` would; :func:`storage_type` says which, and the footprint reports it.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from qviz.cancel import check_cancel
from qviz.quant.config import QuantConfig
from qviz.quant.methods import Method, Request

TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K", "IQ4_NL")
NOMINAL_BITS = {
    "Q8_0": 8,
    "Q6_K": 6,
    "Q5_K": 5,
    "Q5_1": 5,
    "Q5_0": 5,
    "Q4_K": 4,
    "Q4_1": 4,
    "Q4_0": 4,
    "IQ4_NL": 4,
    "Q3_K": 3,
    "Q2_K": 2,
}
DEFAULT_TYPE = {8: "Q8_0", 6: "Q6_K", 5: "Q5_K", 4: "Q4_K", 3: "Q3_K", 2: "Q2_K"}
FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def block_size(qtype: str) -> int:
    """Weights per block of ``qtype`` (32 or 256; 1 for F16)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]


def bits_per_weight(qtype: str) -> float:
    """Stored bits per weight of ``qtype``, block scales included (Q4_K: 4.5, Q6_K: 6.5625)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return nbytes * 8 / block


def type_of(cfg: QuantConfig) -> str:
    """The GGUF type ``cfg`` asks for (its ``type`` setting, else the k-quant of its bits)."""
    t = cfg.setting("type")
    return DEFAULT_TYPE[cfg.bits] if t is None else t


def storage_type(qtype: str, in_features: int) -> str:
    """The type a row of ``in_features`` weights really gets (llama.cpp's fallback rule)."""
    if in_features % block_size(qtype) == 0:
        return qtype
    fallback = FALLBACK.get(qtype, "F16")
    return fallback if in_features % block_size(fallback) == 0 else "F16"


IMATRIX_TYPES = ("Q5_K", "Q4_K", "Q2_K", "IQ4_NL")  # encoders here that weight their error by one


def encode(w: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows [rows, n] (n a multiple of the block) -> GGUF bytes [rows, bytes per row].

    ``importance`` [n]: llama.cpp's imatrix for these rows' input columns (mean squared
    activation), used by the types of ``IMATRIX_TYPES``, ignored by the others."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize

    from qviz.quant.kquants import ENCODERS

    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype not in ENCODERS:
        return quantize(w, GGMLQuantizationType[qtype])
    rows, n = w.shape
    blocks = w.reshape(-1, block_size(qtype))
    if importance is None or qtype not in IMATRIX_TYPES:
        return ENCODERS[qtype](blocks).reshape(rows, -1)
    qw = np.broadcast_to(np.asarray(importance, np.float32), w.shape).reshape(blocks.shape)
    return ENCODERS[qtype](blocks, qw).reshape(rows, -1)


def decode(data: np.ndarray, qtype: str) -> np.ndarray:
    """GGUF bytes [rows, bytes per row] -> float32 [rows, n] (``gguf.quants.dequantize``)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(data, GGMLQuantizationType[qtype])


def gguf_quantize(
    w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """w [out, in] -> dequantized [out, in] in ``qtype`` (or its fallback for this width);
    ``importance`` [in]: the imatrix of w's input columns (see :func:`encode`)."""
    t = storage_type(qtype, w.shape[1])
    if t == "F16":
        return w.detach().to(torch.float16).to(w.dtype)
    x = w.detach().float().cpu().numpy()
    im = None if importance is None else importance.detach().float().cpu().numpy()
    out = torch.from_numpy(np.ascontiguousarray(decode(encode(x, t, im), t)))
    return out.to(device=w.device, dtype=w.dtype)


IMATRIX_WINDOWS = (16, 128)  # n_seq x seq_len calibration tokens of the importance matrix
_IMATRIX: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # key -> {name: [in]}
_IMATRIX_LOCK = threading.Lock()
_IMATRIX_KEEP = 8  # models' matrices kept in memory


def _with_originals(model: nn.Module, items) -> nn.Module:
    """``model``, or a copy sharing its tensors whose targets of ``items`` hold their original
    weights (when a plan is swapped in around this call); the live model is never written."""
    swapped = [(t, w) for t, _, w in items if t.param.data is not w]
    memo = {id(t.param): nn.Parameter(w, requires_grad=False) for t, w in swapped}
    if not memo:
        return model
    for p in model.parameters():
        memo.setdefault(id(p), p)
    return copy.deepcopy(model, memo)


def calibration_importance(
    model: nn.Module, adapter, tokenizer=None, items=()
) -> dict[str, torch.Tensor]:
    """{decoder Linear name: [in] imatrix} of ``model`` on the calibration part of the bundled
    prose (``qviz.data.split_text()[0]``, ``IMATRIX_WINDOWS`` windows), memoized in memory per
    model weights and calibration tokens. ``items``: a Request's (target, config, original)
    triples, whose original weights are used when a plan is swapped in."""
    from qviz.data import split_text
    from qviz.quant.calibrated import calibration_ids, model_fingerprint, model_tokenizer
    from qviz.quant.gptq import importance_matrix

    fp = _with_originals(model, items)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    n_seq, seq_len = IMATRIX_WINDOWS
    ids = calibration_ids(
        model_tokenizer(model, tokenizer), split_text()[0], n_seq, seq_len, vocab_size=vocab
    )
    ids_sha = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    key = f"{model_fingerprint(fp)}-{ids_sha}"
    with _IMATRIX_LOCK:
        if key in _IMATRIX:
            _IMATRIX.move_to_end(key)
            return _IMATRIX[key]
    device = next(fp.parameters()).device
    im = importance_matrix(fp, adapter, ids.to(device))
    with _IMATRIX_LOCK:
        _IMATRIX[key] = im
        while len(_IMATRIX) > _IMATRIX_KEEP:
            _IMATRIX.popitem(last=False)
    return im


class GGUF(Method):
    """llama.cpp's GGUF types (setting ``type``, see the module docstring) and ``imatrix``."""

    name = "gguf"
    defaults = {"type": None, "imatrix": False}

    def check_setting(self, key: str, value):
        if key == "imatrix":
            if not isinstance(value, bool):
                raise ValueError(f"imatrix must be True or False, got imatrix={value!r}")
            return value
        if value is None:
            return None
        t = value.upper() if isinstance(value, str) else value
        if t not in TYPES:
            raise ValueError(f"unknown GGUF type {value!r}; choices: {', '.join(TYPES)}")
        return t

    def label_suffix(self, settings) -> str:
        s = dict(settings)
        return (f"-{s['type']}" if "type" in s else "") + ("-im" if s.get("imatrix") else "")

    def group_size_ok(self, group_size: int | None, in_features: int) -> bool:
        return True  # the type fixes its blocks; the config's group size is not used

    def check_plan(self, cfgs: list[QuantConfig]) -> None:
        for cfg in cfgs:
            t = cfg.setting("type")
            if t is None and cfg.bits not in DEFAULT_TYPE:
                raise ValueError(
                    f"method='gguf' has no type of bits={cfg.bits}; give type= one of "
                    f"{', '.join(TYPES)}"
                )
            if t is not None and NOMINAL_BITS[t] != cfg.bits:
                raise ValueError(
                    f"GGUF type {t} stores {NOMINAL_BITS[t]}-bit codes, not bits={cfg.bits}: "
                    f"use QuantConfig({NOMINAL_BITS[t]}, method='gguf', type={t!r})"
                )
            if cfg.setting("imatrix") and type_of(cfg) not in IMATRIX_TYPES:
                raise ValueError(
                    f"GGUF type {type_of(cfg)} uses no importance matrix here (imatrix=True); "
                    f"types that use one: {', '.join(IMATRIX_TYPES)}"
                )

    def parse_spec(self, arg: str) -> dict:
        """``gguf:Q4_K`` -> {"type": "Q4_K"}; ``gguf:Q2_K+imatrix`` -> also {"imatrix": True}
        (an unknown type or option names the choices)."""
        qtype, *opts = arg.split("+")
        out = {"type": self.check_setting("type", qtype.strip())}
        for opt in opts:
            if opt.strip().lower() != "imatrix":
                raise ValueError(
                    f"unknown GGUF option {opt.strip()!r} in gguf:{arg}; choices: imatrix "
                    f"(gguf:TYPE+imatrix, TYPE one of {', '.join(IMATRIX_TYPES)})"
                )
            out["imatrix"] = True
        return out

    def spec_config(self, bits: int, group_size, settings: dict) -> QuantConfig:
        """``gguf:TYPE``: that type at its nominal bits; plain ``gguf``: the k-quant of ``bits``
        (the type fixes its blocks, so the group size is not used)."""
        if "type" in settings:
            cfg = gguf_config(settings["type"], imatrix=settings.get("imatrix", False))
        else:
            cfg = QuantConfig(bits, None, method="gguf", **settings)
        self.check_plan([cfg])
        return cfg

    def storage(self, cfg: QuantConfig, in_features: int) -> tuple[str, float]:
        """(the GGUF type a Linear of ``in_features`` inputs gets, its bits per weight)."""
        t = storage_type(type_of(cfg), in_features)
        return t, bits_per_weight(t)

    def quantize_weight(self, w: torch.Tensor, cfg: QuantConfig, name: str) -> torch.Tensor:
        """w [out, in] -> dequantized [out, in] through the GGUF bytes of its type."""
        self.check_plan([cfg])
        if cfg.setting("imatrix"):
            raise NotImplementedError(
                f"{cfg.label} needs the model's activations (imatrix=True): use "
                "QuantEngine.materialize, not quantize_weight"
            )
        return gguf_quantize(w, type_of(cfg))

    def materialize(self, req: Request) -> dict[str, torch.Tensor]:
        """{name: dequantized weight}; the imatrix configs weight by the calibration text's
        importance matrix of ``req.model`` (:func:`calibration_importance`, once per model)."""
        im = {}
        if any(c.setting("imatrix") for _, c, _ in req.items):
            check_cancel(req.cancel, "gguf importance matrix")
            im = calibration_importance(req.model, req.adapter, req.tokenizer, req.items)
        out = {}
        for t, c, w in req.items:
            check_cancel(req.cancel, f"gguf {t.name}")
            self.check_plan([c])
            a2 = im.get(t.name) if c.setting("imatrix") else None
            x = w.t() if t.layout == "in_out" else w
            q = gguf_quantize(x, type_of(c), a2)
            out[t.name] = q.t().contiguous() if t.layout == "in_out" else q
        return out


def gguf_config(qtype: str, imatrix: bool = False) -> QuantConfig:
    """``QuantConfig`` of GGUF type ``qtype`` ("Q4_K", case-insensitive), its nominal bits;
    ``imatrix=True``: weighted by the calibration text's importance matrix."""
    from qviz.quant.methods import METHODS

    t = METHODS["gguf"].check_setting("type", qtype)
    if t is None:
        raise ValueError(f"unknown GGUF type {qtype!r}; choices: {', '.join(TYPES)}")
    return QuantConfig(NOMINAL_BITS[t], None, method="gguf", type=t, imatrix=imatrix)
