"""What calibrated methods share: calibration windows of text, and a verified disk cache.

``calibration_ids`` draws fixed-seed token windows of the bundled prose; ``model_fingerprint``
identifies a model's weights cheaply; ``save_cache`` / ``load_cache`` keep a method's weights as
safetensors whose metadata holds the key and a sha256 of the contents, so a stale, truncated or
corrupt file is detected (and rebuilt by the caller), never used.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import nn


# calibration windows -----------------------------------------------------------------------
def _token_ids(tokenizer, text: str, vocab_size: int | None) -> list[int]:
    if tokenizer is None:  # byte-level fallback (tiny test models without a tokenizer)
        return [b % (vocab_size or 256) for b in text.encode()]
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer(text)["input_ids"])


def model_tokenizer(model: nn.Module, tokenizer=None):
    """``tokenizer``, else the one saved beside ``model`` (its config's ``_name_or_path``, local
    files only), else None (calibration then uses byte-level ids)."""
    if tokenizer is not None:
        return tokenizer
    path = getattr(getattr(model, "config", None), "_name_or_path", "")
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # no tokenizer at hand: byte-level calibration ids
        return None


def calibration_ids(
    tokenizer,
    text: str | None = None,
    n_seq: int = 128,
    seq_len: int = 256,
    seed: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """[n_seq, seq_len] int64 windows of ``text`` (default: the bundled prose) at positions drawn
    by a torch.Generator seeded with ``seed``. ``tokenizer=None``: bytes mod ``vocab_size``."""
    if text is None:
        from qviz.data import load_text

        text = load_text()
    ids = _token_ids(tokenizer, text, vocab_size)
    if not ids:
        raise ValueError("calibration text is empty")
    while len(ids) < seq_len:
        ids = ids + ids
    ids_t = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_seq,), generator=gen)
    return torch.stack([ids_t[s : s + seq_len] for s in starts.tolist()])


# disk cache ----------------------------------------------------------------------------------
def _sha(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def model_fingerprint(model: nn.Module, samples: int = 64) -> str:
    """model_type + sha256 of every parameter's name, shape, dtype and a few strided samples."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(_sha(flat[:: max(1, flat.numel() // samples)][:samples].float()).encode())
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return f"{model_type}-{h.hexdigest()}"


def _contents_sha(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}{tuple(t.shape)}{t.dtype}{_sha(t)}".encode())
    return h.hexdigest()


def save_cache(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
    save_file(cpu, str(tmp), metadata={"key": key, "sha256": _contents_sha(cpu)})
    os.replace(tmp, path)


def load_cache(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors, or None when missing, unreadable, for another key or corrupt."""
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # truncated or garbled file
        warnings.warn(
            f"quantization cache {path} is unreadable ({err}); rebuilding it", stacklevel=2
        )
        return None
    if meta.get("key") != key or meta.get("sha256") != _contents_sha(tensors):
        warnings.warn(f"cache {path} failed verification; rebuilding it", stacklevel=2)
        return None
    return tensors
