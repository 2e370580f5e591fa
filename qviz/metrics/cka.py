"""Linear CKA (centered kernel alignment) between every pair of reference/quantized layers.

Biased estimator: Kornblith et al. 2019, HSIC of centered linear Gram matrices.
Unbiased estimator: Nguyen et al. 2021, the U-statistic HSIC of Song et al. 2012.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

__all__ = ["GRAM_BYTES", "GramSide", "cka_matrix", "cka_with_reference"]

Estimator = Literal["biased", "unbiased"]

# a layer counts as zero-variance when HSIC(X, X) <= (rtol * mean_i ||x_i||^2)^2, i.e. its
# centered second moment is below ~rtol of its raw one: float64 round-off of a constant
_DEGENERATE_RTOL = 1e-16

# whole flat Gram matrices of one side at most this large (float64 [L, N*N]; at 31 layers up to
# N ~ 360 samples): built once per layer and kept (``GramSide``), instead of in row blocks
GRAM_BYTES = 32 << 20


def _grams(x: list[Tensor] | Tensor) -> tuple[Tensor, Tensor]:
    """Linear Gram matrices of feature-centered activations: [L, N, D] -> float64 [L, N, N].

    Also returns each layer's raw second moment mean_i ||x_i||^2 [L] (a scale for round-off).
    A list of L tensors [N, D_l] may mix feature widths; a single [N, D] gives L = 1.
    """
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError("cka_matrix needs at least one layer")
        if len({tuple(t.shape) for t in x}) > 1:  # mixed widths: one Gram per layer
            parts = [_grams(t.reshape(t.shape[0], -1)[None]) for t in x]
            return torch.cat([g for g, _ in parts]), torch.cat([m for _, m in parts])
        x = torch.stack(list(x))
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"expected activations [L, N, D], got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    moment = (x * x).sum(dim=2).mean(dim=1)
    x = x - x.mean(dim=1, keepdim=True)  # linear kernel: (HX)(HX)^T = H K H
    return x @ x.transpose(1, 2), moment


class _Centered:
    """Activations [L, N, D] (any float dtype, kept as given) read one feature-centered float64
    layer [N, D] at a time: no float64 copy of all L layers (at 1,024 tokens x 31 layers that
    copy was ~0.15 GB per side). Also each layer's raw second moment mean_i ||x_i||^2 [L]."""

    def __init__(self, x: Tensor) -> None:
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3:
            raise ValueError(f"expected activations [L, N, D], got shape {tuple(x.shape)}")
        self.x = x.detach()
        self.n = x.shape[1]
        means, moments = [], []
        for xl in self.x:
            xl = xl.to(torch.float64)
            means.append(xl.mean(dim=0))
            moments.append(xl.flatten() @ xl.flatten() / self.n)
        self.mean, self.moment = torch.stack(means), torch.stack(moments)

    def __len__(self) -> int:
        return self.x.shape[0]

    def layer(self, i: int, device: torch.device) -> Tensor:
        """Layer ``i`` feature-centered in float64 on ``device``: [N, D]."""
        xl = self.x[i].to(device, torch.float64, copy=True)
        xl -= self.mean[i].to(device)
        return xl

    def gram_rows(self, r0: int, r1: int, device: torch.device) -> Tensor:
        """Rows r0:r1 of every layer's centered Gram matrix: float64 [L, r1 - r0, N]."""
        out = torch.empty(len(self), r1 - r0, self.n, dtype=torch.float64, device=device)
        for i in range(len(self)):
            xl = self.layer(i, device)
            torch.matmul(xl[r0:r1], xl.T, out=out[i])
        return out


def _biased_blocked(
    xc: _Centered, yc: _Centered, block: int, with_reference: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Biased HSIC of every pair, the Gram matrices built ``block`` rows at a time:
    (cross [La, Lb], self x [La], self y [Lb], x-vs-x [La, La] or None), memory O(L block N)
    instead of O(L N^2), each layer centered in float64 only while its rows are built."""
    n, dev = xc.n, xc.x.device
    cross = torch.zeros(len(xc), len(yc), dtype=torch.float64, device=dev)
    ref = torch.zeros(len(xc), len(xc), dtype=torch.float64, device=dev) if with_reference else None
    sx = torch.zeros(len(xc), dtype=torch.float64, device=dev)
    sy = torch.zeros(len(yc), dtype=torch.float64, device=dev)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        fx = xc.gram_rows(r0, r1, dev).flatten(1)  # rows r0.. of each Gram, flat [La, b N]
        fy = yc.gram_rows(r0, r1, dev).flatten(1)  # [Lb, b N]
        cross += fx @ fy.T
        if ref is not None:
            ref += fx @ fx.T
        sx += torch.einsum("ij,ij->i", fx, fx)  # no [L, b N] temporary
        sy += torch.einsum("ij,ij->i", fy, fy)
        del fx, fy
    d = (n - 1) ** 2
    return cross / d, sx / d, sy / d, None if ref is None else ref / d


def _paired(ref: Tensor, quant: Tensor) -> tuple[_Centered, _Centered]:
    xc, yc = _Centered(ref), _Centered(quant)
    if xc.n != yc.n:
        raise ValueError(f"ref has {xc.n} samples but quant has {yc.n}")
    if xc.n < 2:
        raise ValueError(f"CKA needs n >= 2 samples, got n={xc.n}")
    yc.mean, yc.moment = yc.mean.to(xc.x.device), yc.moment.to(xc.x.device)
    return xc, yc


def _normalize(cross: Tensor, sx, sy, mx, my, warn: bool = True) -> Tensor:
    bad_x, bad_y = _degenerate(sx, mx), _degenerate(sy, my)
    if warn and (bad_x.any() or bad_y.any()):
        warnings.warn(
            f"zero-variance activations (ref layers {bad_x.nonzero().flatten().tolist()}, "
            f"quant layers {bad_y.nonzero().flatten().tolist()}): their CKA is set to 0",
            RuntimeWarning,
            stacklevel=3,
        )
    denom = torch.sqrt(torch.outer(sx.clamp_min(0), sy.clamp_min(0)))
    bad = bad_x[:, None] | bad_y[None, :]
    return torch.where(bad, torch.zeros_like(cross), cross / torch.where(bad, 1.0, denom))


class GramSide:
    """One side of a biased linear CKA, prepared once and reusable against many others: each
    layer's centred Gram matrix, flat (float64 [L, N*N], built one layer at a time), its biased
    self-HSIC [L] and raw second moment [L]; ``self_map()``: its own CKA map [L, L]. For
    activations [L, N, D] whose Grams fit ``GRAM_BYTES`` (``fits``)."""

    def __init__(self, x: Tensor) -> None:
        xc = _Centered(x)
        if xc.n < 2:
            raise ValueError(f"CKA needs n >= 2 samples, got n={xc.n}")
        self.n, self.moment, dev = xc.n, xc.moment, xc.x.device
        self.grams = torch.empty(len(xc), xc.n * xc.n, dtype=torch.float64, device=dev)
        for i in range(len(xc)):
            xl = xc.layer(i, dev)
            torch.matmul(xl, xl.T, out=self.grams[i].view(xc.n, xc.n))
        d = (xc.n - 1) ** 2
        self.self_hsic = torch.einsum("ij,ij->i", self.grams, self.grams) / d
        self._self_map: Tensor | None = None

    @staticmethod
    def fits(x: Tensor) -> bool:
        """Whether the Grams of ``x`` [L, N, D] (or [N, D]) fit ``GRAM_BYTES``."""
        layers = x.shape[0] if x.dim() == 3 else 1
        return layers * x.shape[-2] ** 2 * 8 <= GRAM_BYTES

    @property
    def nbytes(self) -> int:
        return self.grams.numel() * 8

    def against(self, other: GramSide) -> Tensor:
        """Biased CKA [L_self, L_other] (zero-variance layers: 0, with a RuntimeWarning)."""
        if other.n != self.n:
            raise ValueError(f"ref has {self.n} samples but quant has {other.n}")
        cross = self.grams @ other.grams.to(self.grams.device).T / (self.n - 1) ** 2
        return _normalize(cross, self.self_hsic, other.self_hsic, self.moment, other.moment)

    def self_map(self) -> Tensor:
        """Biased CKA of this side against itself [L, L] (computed once)."""
        if self._self_map is None:
            cross = self.grams @ self.grams.T / (self.n - 1) ** 2
            sx, mx = self.self_hsic, self.moment
            self._self_map = _normalize(cross, sx, sx, mx, mx, warn=False)
        return self._self_map


def cka_with_reference(
    ref: Tensor | GramSide, quant: Tensor, block: int = 128
) -> tuple[Tensor, Tensor]:
    """Biased linear CKA of ``ref`` [La, N, D1] against ``quant`` [Lb, N, D2] and of ``ref``
    against itself. Both sides' whole Grams built one layer at a time where they fit
    ``GRAM_BYTES`` (``ref`` may be given prepared: a ``GramSide``, reused across calls), else
    in one pass over row blocks of the Gram matrices (memory O(L block N)).

    Returns (float64 [La, Lb], float64 [La, La]); equal to ``cka_matrix(ref, quant)`` and
    ``cka_matrix(ref, ref)`` up to float64 round-off.
    """
    if isinstance(ref, GramSide) or (GramSide.fits(ref) and GramSide.fits(quant)):
        side = ref if isinstance(ref, GramSide) else GramSide(ref)
        if quant.shape[-2] != side.n:
            raise ValueError(f"ref has {side.n} samples but quant has {quant.shape[-2]}")
        return side.against(GramSide(quant)), side.self_map()
    xc, yc = _paired(ref, quant)
    cross, sx, sy, rr = _biased_blocked(xc, yc, block, with_reference=True)
    mx, my = xc.moment, yc.moment
    return _normalize(cross, sx, sy, mx, my), _normalize(rr, sx, sx, mx, mx, warn=False)


def _hsic_biased(k: Tensor, m: Tensor) -> Tensor:
    """All-pairs biased HSIC of centered Grams k [A, N, N], m [B, N, N] -> [A, B]."""
    n = k.shape[-1]
    return torch.einsum("anm,bnm->ab", k, m) / (n - 1) ** 2


def _hsic_unbiased(k: Tensor, m: Tensor) -> Tensor:
    """All-pairs unbiased HSIC (Song et al. 2012) of Grams k [A, N, N], m [B, N, N] -> [A, B]."""
    n = k.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    k = k.masked_fill(eye, 0.0)
    m = m.masked_fill(eye, 0.0)
    trace = torch.einsum("anm,bnm->ab", k, m)  # tr(K~ L~), both symmetric
    rk, rm = k.sum(dim=2), m.sum(dim=2)  # K~ 1, L~ 1: [A, N], [B, N]
    sums = torch.outer(rk.sum(dim=1), rm.sum(dim=1))  # 1^T K~ 1 * 1^T L~ 1
    cross = rk @ rm.T  # 1^T K~ L~ 1
    return (trace + sums / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def _self_hsic(g: Tensor, estimator: Estimator) -> Tensor:
    """HSIC(X, X) for each layer of Grams g [L, N, N] -> [L] (no all-pairs product)."""
    n = g.shape[-1]
    if estimator == "biased":
        return (g * g).sum(dim=(1, 2)) / (n - 1) ** 2
    g = g.masked_fill(torch.eye(n, dtype=torch.bool, device=g.device), 0.0)
    r = g.sum(dim=2)  # [L, N]
    s = r.sum(dim=1)
    trace = (g * g).sum(dim=(1, 2))
    return (trace + s * s / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (r * r).sum(dim=1)) / (
        n * (n - 3)
    )


def _degenerate(self_hsic: Tensor, moment: Tensor) -> Tensor:
    """Layers whose HSIC(X, X) is (numerically) zero: [L] bool."""
    return self_hsic <= (_DEGENERATE_RTOL * moment) ** 2


def cka_matrix(
    ref: list[Tensor] | Tensor,
    quant: list[Tensor] | Tensor,
    estimator: Estimator = "biased",
) -> Tensor:
    """Linear CKA between every reference layer (rows) and every quantized layer (columns).

    ref: [La, N, D1] (or a list of La tensors [N, D_l]); quant: [Lb, N, D2], same N samples.
    Returns float64 [La, Lb] (typically [L+1, L+1]). Layers with zero variance get CKA 0 and a
    RuntimeWarning. The unbiased estimator needs N >= 4. The biased one on tensors builds
    the Gram matrices 128 rows at a time (memory O(L 128 N), not O(L N^2)).
    """
    if estimator not in ("biased", "unbiased"):
        raise ValueError(f"estimator must be 'biased' or 'unbiased', got {estimator!r}")
    if estimator == "biased" and isinstance(ref, Tensor) and isinstance(quant, Tensor):
        xc, yc = _paired(ref, quant)
        cross, sx, sy, _ = _biased_blocked(xc, yc, 128, with_reference=False)
        return _normalize(cross, sx, sy, xc.moment, yc.moment)
    (kx, mx), (ky, my) = _grams(ref), _grams(quant)
    if kx.shape[1] != ky.shape[1]:
        raise ValueError(f"ref has {kx.shape[1]} samples but quant has {ky.shape[1]}")
    n = kx.shape[1]
    if estimator == "unbiased" and n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs n >= 4 samples, got n={n}")
    if estimator == "biased" and n < 2:
        raise ValueError(f"CKA needs n >= 2 samples, got n={n}")
    ky, my = ky.to(kx.device), my.to(kx.device)
    hsic = _hsic_biased if estimator == "biased" else _hsic_unbiased
    cross = hsic(kx, ky)  # [La, Lb], one einsum over all pairs
    sx, sy = _self_hsic(kx, estimator), _self_hsic(ky, estimator)
    return _normalize(cross, sx, sy, mx, my)
