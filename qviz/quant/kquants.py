"""Encoders of llama.cpp's k-quants and IQ4_NL in numpy, vectorized over blocks.

Ports of ``ggml-quants.c``'s reference row quantizers (``quantize_row_q{2,3,4,5,6}_K_ref``,
``quantize_row_iq4_nl_ref`` without an importance matrix) and their helpers
``make_qkx2_quants`` / ``make_qx_quants`` / ``make_q3_quants``. Each encoder takes float32
rows [rows, n] (n a multiple of the type's block size) and returns the GGUF bytes
[rows, n / block * type_size] (uint8), which ``gguf.quants.dequantize`` decodes. The loops run
over a block's candidate scales or positions, never over blocks; sums may be taken in another
order than the C code, so a code may differ from llama.cpp's where two choices tie to rounding.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
EPS = 1e-15  # GROUP_MAX_EPS
IQ4NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32
)


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the fp16 bytes [..., 2], their value as float32) of ``x``."""
    h = np.asarray(x, np.float32).astype(np.float16)
    return h.reshape(*h.shape, 1).view(np.uint8), h.astype(np.float32)


def _safe(x: np.ndarray) -> np.ndarray:
    return np.where(x == 0, 1, x)


def _take_absmax(x: np.ndarray) -> np.ndarray:
    """x [G, n] -> [G] the element of largest magnitude (the first one on ties)."""
    return np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)[:, 0]


# helpers of ggml-quants.c ----------------------------------------------------------------------
def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """x, w [G, n] -> (scale [G], min [G] (>= 0, subtracted), codes [G, n] in 0..nmax)."""
    mn = np.minimum(x.min(1), 0)
    mx = x.max(1)
    flat = mx == mn
    sum_w, sum_x = w.sum(1), (w * x).sum(1)

    def error(scale, mn, L):
        d = scale[:, None] * L + mn[:, None] - x
        return (w * (np.abs(d) if use_mad else d * d)).sum(1)

    iscale = nmax / _safe(mx - mn)
    scale = 1 / iscale
    L = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = error(scale, mn, L)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / _safe(mx - mn)
        La = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        sl, sl2, sxl = (w * La).sum(1), (w * La * La).sum(1), (w * La * x).sum(1)
        D = sum_w * sl2 - sl * sl
        ok = D > 0
        ts = (sum_w * sxl - sum_x * sl) / _safe(D)
        tm = (sl2 * sum_x - sl * sxl) / _safe(D)
        pos = tm > 0
        ts = np.where(pos, sxl / _safe(sl2), ts)
        tm = np.where(pos, 0, tm)
        better = ok & (error(ts, tm, La) < best)
        best = np.where(better, error(ts, tm, La), best)
        L = np.where(better[:, None], La, L)
        scale, mn = np.where(better, ts, scale), np.where(better, tm, mn)
    scale = np.where(flat, 0, scale)
    L = np.where(flat[:, None], 0, L)
    return scale.astype(np.float32), (-mn).astype(np.float32), L.astype(np.uint8)


def make_qx_scale(x, nmax, w):
    """The scale of ``make_qx_quants`` (symmetric codes -nmax..nmax-1) per row of x [G, n]."""
    mx = _take_absmax(x)
    zero = np.abs(mx) < EPS
    mx = _safe(np.where(zero, 0, mx))

    def sums(iscale):
        lv = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return (w * x * lv).sum(1), (w * lv * lv).sum(1)

    slx, sl2 = sums(-nmax / mx)
    scale = np.where(sl2 > 0, slx / _safe(sl2), 0)
    best = scale * slx
    for step in range(-9, 10):
        if step == 0:
            continue
        slx, sl2 = sums(-(nmax + 0.1 * step) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = np.where(better, slx / _safe(sl2), scale)
        best = np.where(better, scale * slx, best)
    return np.where(zero, 0, scale).astype(np.float32)


def make_q3_quants(x, nmax):
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: (scale [G], codes [G, n] in 0..2nmax-1)."""
    mx = _take_absmax(x)
    zero = np.abs(mx) < EPS
    mx = _safe(np.where(zero, 0, mx))
    L = np.clip(np.rint((-nmax / mx)[:, None] * x), -nmax, nmax - 1)
    w = x * x
    slx, sl2 = (w * x * L).sum(1), (w * L * L).sum(1)
    for _ in range(5):  # coordinate descent, one position at a time (vectorized over groups)
        changed = np.zeros(len(x), bool)
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], L[:, i]
            s1 = slx - wi * xi * li
            s2 = sl2 - wi * li * li
            new = np.clip(np.rint(xi * s2 / _safe(s1)), -nmax, nmax - 1)
            n1, n2 = s1 + wi * xi * new, s2 + wi * new * new
            take = (s1 > 0) & (new != li) & (n2 > 0) & (n1 * n1 * sl2 > slx * slx * n2)
            L[:, i] = np.where(take, new, li)
            slx, sl2 = np.where(take, n1, slx), np.where(take, n2, sl2)
            changed |= take
        if not changed.any():
            break
    scale = np.where(zero, 0, slx / _safe(sl2))
    return scale.astype(np.float32), np.where(zero[:, None], 0, L) + nmax


def _pack_crumbs(L: np.ndarray) -> np.ndarray:
    """2-bit codes L [nb, 256] -> qs [nb, 64]: byte l of chunk c holds L[c*128 + 32q + l] << 2q."""
    L = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return sum(L[:, :, q] << (2 * q) for q in range(4)).astype(np.uint8).reshape(-1, 64)


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """4-bit codes L [nb, 256] -> qs [nb, 128] (Q4_K / Q5_K layout)."""
    L = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins [nb, 8] -> the 12 bytes of Q4_K / Q5_K."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    return np.concatenate(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        axis=1,
    )


# the k-quants ----------------------------------------------------------------------------------
def _k_minmax(x: np.ndarray, sub: int, nmax: int, scale_max: int, qkx2_args, w: np.ndarray):
    """Shared by Q2_K / Q4_K / Q5_K: per sub-block scale and min (weighted error, weights w
    [nb, 256]), quantized to ``scale_max`` levels against the block's fp16 d / dmin; returns
    (d bytes, dmin bytes, ls, lm, codes)."""
    nb = x.shape[0]
    xs = x.reshape(-1, sub)
    sc, mins, L0 = make_qkx2_quants(xs, w.reshape(-1, sub), nmax, *qkx2_args)
    sc, mins, L0 = sc.reshape(nb, -1), mins.reshape(nb, -1), L0.reshape(nb, -1, sub)
    max_scale, max_min = np.maximum(sc.max(1), 0), np.maximum(mins.max(1), 0)
    inv_s = np.where(max_scale > 0, scale_max / _safe(max_scale), 0)
    inv_m = np.where(max_min > 0, scale_max / _safe(max_min), 0)
    ls = np.clip(np.rint(inv_s[:, None] * sc), 0, scale_max)
    lm = np.clip(np.rint(inv_m[:, None] * mins), 0, scale_max)
    d_b, d = _f16(max_scale / scale_max)
    m_b, dm = _f16(max_min / scale_max)
    dd = (d[:, None] * ls)[..., None]
    dmm = (dm[:, None] * lm)[..., None]
    xr = x.reshape(nb, -1, sub)
    L = np.clip(np.rint((xr + dmm) / _safe(dd)), 0, nmax)
    L = np.where(dd == 0, L0, L).reshape(nb, -1)
    return d_b, m_b, ls, lm, L


def _qk_weights(x: np.ndarray, qw: np.ndarray | None, sigma_scale: float) -> np.ndarray:
    """Error weights of a k-quant's blocks x [nb, 256]. Without an importance matrix, the
    reference's: rms of the 32-wide sub-block + |x| (Q4_K / Q5_K). With one (qw [nb, 256], the
    mean squared activation of each weight's input column, llama.cpp's imatrix), as
    ``quantize_row_q{2,4,5}_K_impl`` weight it: qw * sqrt(sigma2 + x^2), sigma2 =
    ``sigma_scale`` * mean of x^2 over the block."""
    if qw is None:
        xs = x.reshape(-1, 32)
        return (np.sqrt((xs * xs).mean(1, keepdims=True)) + np.abs(xs)).reshape(x.shape)
    sigma2 = sigma_scale * (x * x).mean(1, keepdims=True)
    return qw * np.sqrt(sigma2 + x * x)


def quantize_q4_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Blocks x [nb, 256] -> Q4_K bytes [nb, 144]; ``qw`` [nb, 256]: importance (imatrix)."""
    w = _qk_weights(x, qw, 2.0)
    d, dm, ls, lm, L = _k_minmax(x, 32, 15, 63, (-1.0, 0.1, 20, False), w)
    return np.concatenate([d, dm, _pack_k4_scales(ls, lm), _pack_nibbles(L)], axis=1)


def quantize_q5_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Blocks x [nb, 256] -> Q5_K bytes [nb, 176]; ``qw`` [nb, 256]: importance (imatrix)."""
    w = _qk_weights(x, qw, 2.0)
    d, dm, ls, lm, L = _k_minmax(x, 32, 31, 63, (-0.5, 0.1, 15, False), w)
    L = L.astype(np.uint8)
    hi = (L >> 4).reshape(-1, 8, 32)
    qh = sum(hi[:, s] << s for s in range(8)).astype(np.uint8)
    return np.concatenate([d, dm, _pack_k4_scales(ls, lm), qh, _pack_nibbles(L & 0xF)], axis=1)


def quantize_q2_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Blocks x [nb, 256] -> Q2_K bytes [nb, 84]; ``qw`` [nb, 256]: importance (imatrix)."""
    w = np.abs(x) if qw is None else _qk_weights(x, qw, 1.0)
    d, dm, ls, lm, L = _k_minmax(x, 16, 3, 15, (-0.5, 0.1, 15, True), w)
    scales = (ls.astype(np.uint8) | (lm.astype(np.uint8) << 4)).astype(np.uint8)
    return np.concatenate([scales, _pack_crumbs(L), d, dm], axis=1)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """Blocks x [nb, 256] -> Q3_K bytes [nb, 110]."""
    nb = x.shape[0]
    sc, L0 = make_q3_quants(x.reshape(-1, 16), 4)
    sc, L0 = sc.reshape(nb, 16), L0.reshape(nb, 16, 16)
    max_scale = _take_absmax(sc)
    has = max_scale != 0
    iscale = np.where(has, -32 / _safe(max_scale), 0)
    lv = (np.clip(np.rint(iscale[:, None] * sc), -32, 31) + 32).astype(np.uint8)
    lv = np.where(has[:, None], lv, 0).astype(np.uint8)
    hi = (lv >> 4).reshape(nb, 4, 4)
    scales = np.concatenate(
        [(lv[:, :8] & 0xF) | ((lv[:, 8:] & 0xF) << 4), sum(hi[:, k] << (2 * k) for k in range(4))],
        axis=1,
    ).astype(np.uint8)
    d_b, d = _f16(np.where(has, 1 / _safe(iscale), 0))
    dd = (d[:, None] * (lv.astype(np.float32) - 32))[..., None]
    L = np.clip(np.rint(x.reshape(nb, 16, 16) / _safe(dd)), -4, 3) + 4
    L = np.where(dd == 0, L0, L).reshape(nb, 256).astype(np.uint8)
    hb = (L > 3).reshape(nb, 8, 32).astype(np.uint8)
    hmask = sum(hb[:, b] << b for b in range(8)).astype(np.uint8)
    return np.concatenate([hmask, _pack_crumbs(L & 3), scales, d_b], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Blocks x [nb, 256] -> Q6_K bytes [nb, 210]."""
    nb = x.shape[0]
    xs = x.reshape(-1, 16)
    sc = make_qx_scale(xs, 32, xs * xs).reshape(nb, 16)
    max_scale = _take_absmax(sc)
    has = np.abs(max_scale) >= EPS
    iscale = np.where(has, -128 / _safe(max_scale), 0)
    ls = np.minimum(127, np.rint(iscale[:, None] * sc)).astype(np.int8)
    d_b, d = _f16(np.where(has, 1 / _safe(iscale), 0))
    dd = (d[:, None] * ls.astype(np.float32))[..., None]
    L = np.clip(np.rint(x.reshape(nb, 16, 16) / _safe(dd)), -32, 31) + 32
    L = np.where(dd == 0, 32, L).reshape(nb, 2, 4, 32).astype(np.uint8)
    lo, hi = L & 0xF, L >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2)
    qh = sum(hi[:, :, q] << (2 * q) for q in range(4)).astype(np.uint8)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), ls.view(np.uint8), d_b], axis=1)


_IQ4NL_MIDS = (IQ4NL_VALUES[1:] + IQ4NL_VALUES[:-1]) / 2


def _best_index(v: np.ndarray) -> np.ndarray:
    """``best_index_int8``: the index of the IQ4_NL value nearest to each of v (the upper one
    at a midpoint, as the C code's ``x - val[mu-1] < val[mu] - x`` test)."""
    return np.searchsorted(_IQ4NL_MIDS, v, side="right")


def quantize_iq4_nl(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Blocks x [nb, 32] -> IQ4_NL bytes [nb, 18] (ntry = 7). ``qw`` [nb, 32]: an importance
    matrix, weighting as ``quantize_row_iq4_nl_impl`` does: qw * sqrt(2 * mean(x^2) + x^2)."""
    vals = IQ4NL_VALUES
    w = x * x if qw is None else _qk_weights(x, qw, 2.0)
    mx = _take_absmax(x)
    zero = np.abs(mx) < EPS
    mx = _safe(np.where(zero, 0, mx))

    def sums(iscale):
        q = vals[_best_index(iscale[:, None] * x)]
        return (w * q * x).sum(1), (w * q * q).sum(1)

    sqx, sq2 = sums(1 / (-mx / vals[0]))
    d = sqx / _safe(sq2)
    best = d * sqx
    for itry in range(-7, 8):
        sqx, sq2 = sums((itry + vals[0]) / mx)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = np.where(better, sqx / _safe(sq2), d)
        best = np.where(better, d * sqx, best)
    d = np.where(zero, 0, d)
    d_b, _ = _f16(d)
    L = _best_index(np.where(d != 0, 1 / _safe(d), 0)[:, None] * x).astype(np.uint8)
    return np.concatenate([d_b, L[:, :16] | (L[:, 16:] << 4)], axis=1)


ENCODERS = {
    "Q2_K": quantize_q2_k,
    "Q3_K": quantize_q3_k,
    "Q4_K": quantize_q4_k,
    "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k,
    "IQ4_NL": quantize_iq4_nl,
}
