"""The K-quant quantizers (Q4_K, Q5_K, Q6_K) the ``gguf`` package lacks.

gguf 0.19 can read these types (``gguf.quants.dequantize``) but not write
them, and they are what llama.cpp users ask for (Q4_K_M, Q5_K_M). This is
llama.cpp's reference quantizer (``ggml-quants.c``: ``quantize_row_q4_K_ref``,
``quantize_row_q5_K_ref``, ``quantize_row_q6_K_ref`` with ``make_qkx2_quants``
and ``make_qx_quants``), the path ``llama-quantize`` takes without an
importance matrix, written over numpy arrays of blocks instead of one block
at a time. All arithmetic is float32 as in C; ``nearest_int`` rounds half to
even (the C trick adds 1.5 * 2^23 under the default rounding mode), as
``np.rint`` does; sums run left to right as C's loops do (``_seqsum``, not
numpy's pairwise sum), since the choice between candidate scales can turn on
the last bit. Tests compare the bytes with llama.cpp's own quantizer where
llama-cpp-python is installed.

Block layouts are those ``gguf.quants`` dequantizes (and llama.cpp reads):
Q4_K: d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles;
Q5_K: the same plus 32 bytes of high bits before the nibbles; Q6_K: 128 bytes
of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d (f16).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
ROWS_PER_CHUNK = 64  # rows quantized at a time: bounds the temporaries


def _f16(x: np.ndarray) -> np.ndarray:
    """Round through f16, as GGML_FP32_TO_FP16 then back: the value llama.cpp uses."""
    return x.astype(np.float16).astype(np.float32)


def _nearest(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)


def _seqsum(x: np.ndarray) -> np.ndarray:
    """Row sums in C's order, one float32 addition after another."""
    return np.cumsum(x, axis=1, dtype=np.float32)[:, -1]


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, min, L) for each row of ``x`` (groups, n): the asymmetric
    quantization x ~ scale * L - min with L in 0..nmax that minimises the
    weighted squared error over ``nstep + 1`` trial scales."""
    f32 = np.float32
    mn = np.minimum(x.min(axis=1), f32(0))
    mx = x.max(axis=1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(nmax) / np.where(flat, f32(1), mx - mn)
        scale = f32(1) / iscale
    L = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * L.astype(f32) + mn[:, None] - x
    best = _seqsum(w * (diff * diff))
    for step in range(nstep + 1):
        # the C loop scales from the current min, which a better candidate moves
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            isc = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (mx - mn)
            la = np.clip(_nearest(isc[:, None] * (x - mn[:, None])), 0, nmax)
        lf = la.astype(f32)
        sum_l = _seqsum(w * lf)
        sum_l2 = _seqsum(w * lf * lf)
        sum_xl = _seqsum(w * lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, f32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            d = this_scale[:, None] * lf + this_min[:, None] - x
            mad = _seqsum(w * (d * d))
        better = ok & (mad < best) & ~flat
        L = np.where(better[:, None], la, L)
        best = np.where(better, mad, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, f32(0), scale)
    return scale.astype(f32), (-mn).astype(f32), L


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, L) per row of ``x`` for the symmetric x ~ scale * (L - nmax),
    L in 0..2*nmax-1, weights x^2 (``rmse_type`` 1), 19 trial scales."""
    f32 = np.float32
    idx = np.abs(x).argmax(axis=1)  # the first largest |x|, as the C loop keeps
    amax = np.abs(x).max(axis=1)
    vmax = x[np.arange(len(x)), idx]
    zero = amax < f32(1e-30)
    vmax = np.where(zero, f32(1), vmax)
    w = x * x

    def trial(iscale):
        lv = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lv.astype(f32)
        return lv, _seqsum(w * x * lf), _seqsum(w * lf * lf)

    lv, sumlx, suml2 = trial(f32(-nmax) / vmax)
    L = lv + nmax
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = sumlx / suml2
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            lv, sumlx, suml2 = trial(-(f32(nmax) + f32(0.1) * f32(step)) / vmax)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], lv + nmax, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, f32(0), scale)
    L = np.where(zero[:, None], 0, L)
    return scale.astype(f32), L


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins per block into llama.cpp's 12 bytes
    (the inverse of ``get_scale_min_k4``)."""
    out = np.zeros((len(ls), 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _k4_blocks(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The part Q4_K and Q5_K share: (d, dmin, packed scales, L of shape (n, 256))."""
    f32 = np.float32
    n = len(x)
    sub = x.reshape(n * 8, 32)
    av_x = np.sqrt(_seqsum(sub * sub) / f32(32))
    w = av_x[:, None] + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    # uint8_t ls = nearest_int(...): C's conversion keeps the low byte
    ls = np.minimum(_nearest(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d = _f16(max_scale / f32(63))
    dmin = _f16(max_min / f32(63))
    dl = (d[:, None] * ls.astype(f32)).reshape(n * 8)
    dm = (dmin[:, None] * lm.astype(f32)).reshape(n * 8)
    live = dl != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        redo = np.clip(_nearest((sub + dm[:, None]) / dl[:, None]), 0, nmax)
    L = np.where(live[:, None], redo, L).reshape(n, QK_K).astype(np.uint8)
    head = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(n, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(n, 2),
                           _pack_scales_k4(ls, lm)], axis=1)
    return head, L


def _nibbles(L: np.ndarray) -> np.ndarray:
    """Low 4 bits of each 64-value group: byte l = L[l] | L[l + 32] << 4."""
    g = (L & 0xF).reshape(len(L), 4, 2, 32)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(len(L), 128)


def q4_k_blocks(x: np.ndarray) -> np.ndarray:
    head, L = _k4_blocks(x, 15, -1.0, 0.1, 20)
    return np.concatenate([head, _nibbles(L)], axis=1)


def q5_k_blocks(x: np.ndarray) -> np.ndarray:
    head, L = _k4_blocks(x, 31, -0.5, 0.1, 15)
    hi = (L >> 4).reshape(len(L), 4, 2, 32)  # group k, half h -> bit 2k + h
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (hi << shifts[None, :, :, None]).sum(axis=(1, 2)).astype(np.uint8)
    return np.concatenate([head, qh, _nibbles(L)], axis=1)


def q6_k_blocks(x: np.ndarray) -> np.ndarray:
    f32 = np.float32
    n = len(x)
    sub = x.reshape(n * 16, 16)
    scales, L = make_qx_quants(sub, 32)
    scales = scales.reshape(n, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(n), pick]
    empty = max_scale == 0
    with np.errstate(divide="ignore"):
        iscale = np.where(empty, f32(0), f32(-128) / np.where(empty, f32(1), max_scale))
        d = _f16(np.where(empty, f32(0), f32(1) / np.where(empty, f32(1), iscale)))
    sc = np.minimum(_nearest(iscale[:, None] * scales), 127).astype(np.int8)
    dl = (d[:, None] * sc.astype(f32)).reshape(n * 16)
    live = dl != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        redo = np.clip(_nearest(sub / dl[:, None]), -32, 31) + 32
    L = np.where(live[:, None], redo, L).reshape(n, QK_K)
    L = np.where(empty[:, None], 0, L).astype(np.uint8)
    g = L.reshape(n, 2, 4, 32)  # half j/128, quarter, l
    lo = g & 0xF
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)],
                        axis=2).reshape(n, 128)
    hi = g >> 4
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6))
    qh = qh.reshape(n, 64)
    sc = np.where(empty[:, None], 0, sc).astype(np.int8)
    return np.concatenate([ql, qh, sc.view(np.uint8),
                           d.astype(np.float16).view(np.uint8).reshape(n, 2)], axis=1)


BLOCKS = {"Q4_K": q4_k_blocks, "Q5_K": q5_k_blocks, "Q6_K": q6_k_blocks}


def quantize(data: np.ndarray, type_name: str) -> np.ndarray:
    """``data`` (..., k), k a multiple of 256, as the bytes of ``type_name``
    blocks, shaped (..., k / 256 * block bytes) as ``gguf.quants.quantize`` returns."""
    fn = BLOCKS[type_name]
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.shape[-1] % QK_K:
        raise ValueError(f"rows of {data.shape[-1]} do not divide into {QK_K}-value blocks")
    rows = data.reshape(-1, data.shape[-1])
    per_row = rows.shape[1] // QK_K
    out = [fn(rows[i:i + ROWS_PER_CHUNK].reshape(-1, QK_K)).reshape(
        min(ROWS_PER_CHUNK, len(rows) - i), -1) for i in range(0, len(rows), ROWS_PER_CHUNK)]
    import gguf

    width = per_row * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
    packed = np.concatenate(out, axis=0) if out else np.zeros((0, width), np.uint8)
    return packed.reshape(*data.shape[:-1], width)
