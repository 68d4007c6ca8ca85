"""Quantizers of the GGUF k-quant types Q2_K, Q3_K, Q4_K, Q5_K and Q6_K: ggml's reference C, in numpy.

The ``gguf`` package dequantizes these types but cannot quantize them. llama.cpp's ``llama-quantize``
(without an importance matrix) calls ``quantize_row_q{2..6}_K_ref`` of ggml's ``ggml-quants.c``;
this module is that code, ported operation for operation so its bytes are the same:

* Q4_K / Q5_K: super-blocks of 256 = 8 blocks of 32, ``x ≈ d·sc_j·q − dmin·m_j`` (q of 4 / 5 bits).
  Per block ``make_qkx2_quants`` (weights ``w = √(mean x²) + |x|``) searches ``nstep + 1`` trial
  scales ``(rmin + 0.1·is + nmax) / (max − min)`` and keeps the (scale, min) pair of the least
  weighted squared error (least squares for the pair at each trial); the block scales and mins
  are then quantized to 6 bits against ``d = max scale / 63`` and ``dmin = max min / 63`` (fp16),
  and every value is rounded again against its quantized scale and min: ``q = ⌊(x + dmin·m)/(d·sc)⌉``.
* Q6_K: 16 blocks of 16, ``x ≈ d·sc_j·q`` (q of 6 bits, signed 8-bit scales). Per block
  ``make_qx_quants`` (weights ``x²``) tries ``iscale = −(32 + 0.1·is)/max``, is = −9 … 9, and keeps
  the least-squares scale of the best ``(Σwxl)²/Σwl²``; scales quantized against ``d = max/−128``.
* Q2_K: 16 blocks of 16, ``make_qkx2_quants`` with weights ``|x|`` and absolute error, 4-bit scales
  and mins. Q3_K: 16 blocks of 16, ``make_q3_quants`` (per-element coordinate descent, 5 passes),
  6-bit signed scales.

Bit for bit means float32 arithmetic in the C order: every sum is accumulated left to right (the
blocks sit in columns, one C loop step per row: numpy's pairwise ``sum`` would round differently),
``a*b*c`` is ``(a*b)*c``, ``nearest_int`` is ggml's ``x + 1.5·2²³`` mantissa trick (round half to
even), fp16 conversions round to nearest even. That is the C as llama.cpp builds it on x86-64
(CMake compiles ``ggml-quants.c`` into ``ggml-base`` without ``-march`` flags: no fused
multiply-add). A build whose compiler fuses ``a*b − c*d`` (``-march=native`` on x86; aarch64, where
FMA is baseline) rounds the trial sums differently and picks other, equally good scales in many
blocks (measured with ``-march=native``: 0–60 % of the blocks by type and data, the round-trip
error equal to 0.5 %). Verified bit-exact against ``quantize_row_q{2..6}_K_ref`` of ggml-org/ggml
``src/ggml-quants.c`` (commit d99724f2b141fed9e1a9f402213506c081433465), gcc 12 ``-O2``, on 2 000
random blocks of each of 15 distributions per type and on their dequantizations; golden blocks in
``fixtures/gguf_kquant_golden.json`` (``tests/test_gguf_kquants.py``).

Output: for float32 ``rows`` of shape (..., n·256), the block bytes (..., n·type_size) as
``gguf.quants.quantize`` returns them for other types. No torch.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)  # 1.5 · 2²³
# super-blocks per pass: the [32, 8·CHUNK] float32 work arrays (512 KiB) stay in cache (256 … 512 measured best)
CHUNK = 512


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: the low mantissa bits of ``v + 1.5·2²³`` (round half to even for
    |v| < 2²², and the C's own value for anything else)."""
    return ((v + _MAGIC).view(np.int32) & 0x007FFFFF) - 0x00400000


def _sum(terms: np.ndarray, first: bool = False) -> np.ndarray:
    """Σ over axis 0 left to right, as a C loop adds: from 0.0f, or (``first``) from the first term."""
    acc = terms[0].copy() if first else np.zeros(terms.shape[1:], F32)
    for row in terms[1:] if first else terms:
        acc += row
    return acc


def _positive_max(v: np.ndarray) -> np.ndarray:
    """``m = 0; for each: if (v > m) m = v;`` over axis 1 (never −0.0)."""
    m = v.max(axis=1)
    return np.where(m > 0, m, F32(0))


def _first_absmax(v: np.ndarray, axis: int) -> np.ndarray:
    """The entry of largest magnitude (the first such, as ``if (|v| > amax)`` keeps it)."""
    idx = np.abs(v).argmax(axis=axis)
    return np.take_along_axis(v, np.expand_dims(idx, axis), axis).squeeze(axis)


def _columns(x: np.ndarray, n: int) -> np.ndarray:
    """[nb, 256] super-blocks -> [n, nb·256/n]: block b of n values in column b (one C step per row)."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _rows(cols: np.ndarray, nb: int) -> np.ndarray:
    return cols.T.reshape(nb, QK_K)


def _fp16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def _levels(t: np.ndarray, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """``out = MAX(lo, MIN(hi, nearest_int(t)))`` as float32, in place (``t`` is overwritten)."""
    np.add(t, _MAGIC, out=t)
    ti = t.view(np.int32)
    np.bitwise_and(ti, 0x007FFFFF, out=ti)
    np.subtract(ti, 0x00400000, out=ti)
    np.clip(ti, lo, hi, out=ti)
    np.copyto(out, ti, casting="unsafe")  # small integers: exact
    return out


def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool):
    """ggml ``make_qkx2_quants`` for the blocks in the columns of ``x`` / ``w`` ([n, S] float32):
    (scale [S], the_min [S] (the offset, ≥ 0), L [n, S] int32 in 0 … nmax).

    The trials work in preallocated buffers (fresh pages for every temporary cost more than the
    arithmetic); products are written ``b*a`` where the C has ``a*b`` (IEEE products commute)."""
    zero = F32(0)
    lo = x.min(axis=0)
    hi = x.max(axis=0)
    sum_w = _sum(w, first=True)
    sum_x = _sum(w * x, first=True)
    lo = np.where(lo > 0, zero, lo)
    flat = hi == lo
    t, lf, wl, tmp = (np.empty_like(x) for _ in range(4))

    def error(scale, offset, levels):  # Σ w·err(scale·L + min − x)
        np.multiply(levels, scale, out=tmp)
        np.add(tmp, offset, out=tmp)
        np.subtract(tmp, x, out=tmp)
        if mad:
            np.abs(tmp, out=tmp)
        else:
            np.multiply(tmp, tmp, out=tmp)
        return _sum(np.multiply(tmp, w, out=tmp))

    with np.errstate(all="ignore"):
        iscale = F32(nmax) / (hi - lo)
        scale = F32(1) / iscale
        np.subtract(x, lo, out=t)
        t *= iscale
        best = error(scale, lo, _levels(t, 0, nmax, lf))
        # the levels of the best trial are recomputed at the end from its iscale and min (a masked
        # copy of [n, S] levels per trial costs more than the trial)
        best_iscale, best_lo = iscale, lo
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo)
            np.subtract(x, lo, out=t)
            t *= iscale
            _levels(t, 0, nmax, lf)
            np.multiply(w, lf, out=wl)
            sum_l = _sum(wl)
            sum_l2 = _sum(np.multiply(wl, lf, out=tmp))
            sum_xl = _sum(np.multiply(wl, x, out=tmp))
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, zero, this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min, lf)
            take = (D > 0) & (cur < best) & ~flat
            best_iscale, best_lo = np.where(take, iscale, best_iscale), np.where(take, lo, best_lo)
            best = np.where(take, cur, best)
            scale = np.where(take, this_scale, scale)
            lo = np.where(take, this_min, lo)  # the next trial's range starts at the new min
        np.subtract(x, best_lo, out=t)
        t *= best_iscale
        L = _levels(t, 0, nmax, lf).astype(np.int32)
    return np.where(flat, zero, scale), -lo, np.where(flat, 0, L)


def make_qx_quants(x, nmax: int):
    """ggml ``make_qx_quants`` with ``rmse_type = 1`` and no weights (w = x²), blocks in the columns
    of ``x`` ([n, S]): (scale [S], L [n, S] int32 in 0 … 2·nmax − 1)."""
    zero = F32(0)
    top = _first_absmax(x, 0)
    empty = np.abs(top) < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    t, lf, tmp = (np.empty_like(x) for _ in range(3))

    def trial(iscale):  # levels in lf; Σ w·x·l, Σ w·l·l
        np.multiply(x, iscale, out=t)
        _levels(t, -nmax, nmax - 1, lf)
        sumlx = _sum(np.multiply(wx, lf, out=tmp))
        np.multiply(w, lf, out=tmp)
        return sumlx, _sum(np.multiply(tmp, lf, out=tmp))

    with np.errstate(all="ignore"):
        best_iscale = F32(-nmax) / top
        sumlx, suml2 = trial(best_iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, zero)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / top
            sumlx, suml2 = trial(iscale)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            best_iscale = np.where(take, iscale, best_iscale)  # its levels are recomputed at the end
            scale = np.where(take, sumlx / suml2, scale)
            best = np.where(take, scale * sumlx, best)
        np.multiply(x, best_iscale, out=t)
        L = _levels(t, -nmax, nmax - 1, lf).astype(np.int32) + nmax
    return np.where(empty, zero, scale), np.where(empty, 0, L)


def make_q3_quants(x, nmax: int):
    """ggml ``make_q3_quants`` with ``do_rmse`` (w = x², up to 5 coordinate-descent passes; a pass
    that changes nothing would change nothing again, so every block runs all 5), blocks in the
    columns of ``x`` ([n, S]): (scale [S], L [n, S] int32 in 0 … 2·nmax − 1)."""
    zero = F32(0)
    top = _first_absmax(x, 0)
    empty = np.abs(top) < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    with np.errstate(all="ignore"):
        L = np.clip(_nearest_int((F32(-nmax) / top) * x), -nmax, nmax - 1)
        lf = L.astype(F32)
        sumlx, suml2 = _sum(wx * lf), _sum(w * lf * lf)
        for _ in range(5):
            for i in range(x.shape[0]):
                li = L[i].astype(F32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - w[i] * li * li
                new = np.clip(_nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
                nf = new.astype(F32)
                slx_new = slx + wx[i] * nf
                sl2_new = sl2 + w[i] * nf * nf
                ok = ((slx > 0) & (new != L[i]) & (sl2_new > 0)
                      & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
                L[i] = np.where(ok, new, L[i])
                sumlx = np.where(ok, slx_new, sumlx)
                suml2 = np.where(ok, sl2_new, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, zero)
    return np.where(empty, zero, scale), np.where(empty, 0, L + nmax)


def _requantize(x, d, dm, L, lo: int, hi: int) -> np.ndarray:
    """Each value against its block's quantized scale ``d`` (and offset ``dm``), [nb, blocks]:
    ``⌊(x + dm)/d⌉`` clamped; blocks whose ``d`` is 0 keep the search's ``L``."""
    per = QK_K // d.shape[1]
    dd = np.repeat(d, per, axis=1)
    with np.errstate(all="ignore"):
        v = x + np.repeat(dm, per, axis=1) if dm is not None else x
        q = np.clip(_nearest_int(v / dd), lo, hi) - lo
    return np.where(dd != 0, q, L)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 bytes of 8 six-bit scales and mins (Q4_K / Q5_K; ggml ``get_scale_min_k4`` reads them)."""
    out = np.empty((len(ls), 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _q45_k(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared part of ``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref``: (d, dmin fp16 [nb],
    12 scale bytes [nb, 12], L [nb, 256] in 0 … nmax)."""
    nb = len(x)
    cols = _columns(x, 32)
    av_x = np.sqrt(_sum(cols * cols) / F32(32))
    scales, mins, L = make_qkx2_quants(cols, av_x + np.abs(cols), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)  # uint8_t, then MIN(63, ·)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    d, dmin = _fp16(max_scale / F32(63)), _fp16(max_min / F32(63))
    L = _requantize(x, d.astype(F32)[:, None] * ls.astype(F32), dmin.astype(F32)[:, None] * lm.astype(F32),
                    _rows(L, nb), 0, nmax)
    return d, dmin, _pack_k4_scales(ls, lm), L


def _halves(d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    return np.stack([d, dmin], axis=1).view(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q4_K_ref``: [nb, 256] float32 -> [nb, 144] (d, dmin, scales[12], qs[128])."""
    d, dmin, scales, L = _q45_k(x, 15, -1.0, 20)
    q = L.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_halves(d, dmin), scales, qs.astype(np.uint8)], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q5_K_ref``: [nb, 256] -> [nb, 176] (d, dmin, scales[12], qh[32], qs[128])."""
    d, dmin, scales, L = _q45_k(x, 31, -0.5, 15)
    q = L.reshape(-1, 4, 2, 32)
    high = q >> 4
    shifts = 2 * np.arange(4).reshape(1, 4, 1)
    qh = ((high[:, :, 0] << shifts) | (high[:, :, 1] << (shifts + 1))).sum(axis=1)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    return np.concatenate([_halves(d, dmin), scales, qh.astype(np.uint8), qs.astype(np.uint8)], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q6_K_ref``: [nb, 256] -> [nb, 210] (ql[128], qh[64], scales[16] int8, d)."""
    nb = len(x)
    scales, L = make_qx_quants(_columns(x, 16), 32)
    scales = scales.reshape(nb, 16)
    max_scale = _first_absmax(scales, 1)
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(-128) / max_scale
        d = _fp16(F32(1) / iscale)
        sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    L = _requantize(x, d.astype(F32)[:, None] * sc.astype(F32), None, _rows(L, nb), -32, 31)
    q = L.reshape(nb, 2, 4, 32)
    low = q & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    shifts = 2 * np.arange(4).reshape(1, 1, 4, 1)
    qh = ((q >> 4) << shifts).sum(axis=2)
    out = np.concatenate([ql.reshape(nb, 128).astype(np.uint8), qh.reshape(nb, 64).astype(np.uint8),
                          sc.view(np.uint8), d.reshape(nb, 1).view(np.uint8)], axis=1)
    out[empty] = 0
    return out


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """qs[64] of 256 two-bit values: byte 32·h + l holds L[128h + 32k + l] at bits 2k (Q2_K, Q3_K)."""
    q = L.reshape(-1, 2, 4, 32)
    shifts = 2 * np.arange(4).reshape(1, 1, 4, 1)
    return (q << shifts).sum(axis=2).reshape(-1, 64).astype(np.uint8)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q2_K_ref``: [nb, 256] -> [nb, 84] (scales[16], qs[64], d, dmin)."""
    nb = len(x)
    cols = _columns(x, 16)
    scales, mins, L = make_qkx2_quants(cols, np.abs(cols), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    with np.errstate(all="ignore"):
        ls = np.where(max_scale[:, None] > 0, _nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
        lm = np.where(max_min[:, None] > 0, _nearest_int((F32(15) / max_min)[:, None] * mins), 0)
    sc = (ls | (lm << 4)) & 0xFF  # uint8_t scales[j] = l; scales[j] |= l << 4
    d = _fp16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
    dmin = _fp16(np.where(max_min > 0, max_min / F32(15), F32(0)))
    L = _requantize(x, d.astype(F32)[:, None] * (sc & 0xF).astype(F32),
                    dmin.astype(F32)[:, None] * (sc >> 4).astype(F32), _rows(L, nb), 0, 3)
    return np.concatenate([sc.astype(np.uint8), _pack_2bit(L), _halves(d, dmin)], axis=1)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q3_K_ref``: [nb, 256] -> [nb, 110] (hmask[32], qs[64], scales[12], d)."""
    nb = len(x)
    scales, L = make_q3_quants(_columns(x, 16), 4)
    scales = scales.reshape(nb, 16)
    max_scale = _first_absmax(scales, 1)
    some = max_scale != 0
    with np.errstate(all="ignore"):
        iscale = F32(-32) / max_scale
        ls = _nearest_int(iscale[:, None] * scales).astype(np.int8).astype(np.int32)  # int8_t l = nearest_int(...)
    ls = np.where(some[:, None], np.clip(ls, -32, 31) + 32, 0)
    packed = np.zeros((nb, 12), np.int32)
    packed[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    packed[:, 8:12] = ((ls >> 4).reshape(nb, 4, 4) << (2 * np.arange(4)).reshape(1, 4, 1)).sum(axis=1)
    d = _fp16(np.where(some, F32(1) / iscale, F32(0)))
    sc = ls - 32  # as re-read from the packed bytes
    L = _requantize(x, d.astype(F32)[:, None] * sc.astype(F32), None, _rows(L, nb), -4, 3)
    q = L.reshape(nb, 8, 32)
    high = q > 3
    hmask = (high.astype(np.int32) << np.arange(8).reshape(1, 8, 1)).sum(axis=1)
    low = np.where(high, q - 4, q).reshape(nb, QK_K)
    return np.concatenate([hmask.astype(np.uint8), _pack_2bit(low), packed.astype(np.uint8),
                           d.reshape(nb, 1).view(np.uint8)], axis=1)


QUANTIZERS = {"Q2_K": (quantize_q2_k, 84), "Q3_K": (quantize_q3_k, 110), "Q4_K": (quantize_q4_k, 144),
              "Q5_K": (quantize_q5_k, 176), "Q6_K": (quantize_q6_k, 210)}


def quantize(rows: np.ndarray, type_name: str) -> np.ndarray:
    """Float rows (..., n·256) as ``type_name`` blocks: uint8 (..., n·type_size), row-major like
    ``gguf.quants.quantize``."""
    func, type_size = QUANTIZERS[type_name]
    x = np.ascontiguousarray(rows, dtype=F32)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise ValueError(f"{type_name} rows must be a multiple of {QK_K} values, not {x.shape[-1:]}")
    blocks = x.reshape(-1, QK_K)
    out = np.empty((len(blocks), type_size), np.uint8)
    for start in range(0, len(blocks), CHUNK):
        out[start:start + CHUNK] = func(blocks[start:start + CHUNK])
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * type_size)
