"""loralab's K-quant quantizers (Q4_K, Q5_K, Q6_K), read by the gguf package's
own dequantizers (a separate port of llama.cpp's): the bytes are in the layout
llama.cpp reads, and the error per bit is what the K-quants promise. Where
llama-cpp-python is installed, the bytes are compared with llama.cpp's own
quantizer."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

from loralab.export import kquants


def _rel_rmse(x, qtype, q) -> float:
    back = gguf.quants.dequantize(q, qtype)
    return float(np.sqrt(((back - x) ** 2).mean() / (x ** 2).mean()))


def _gaussian(rows=64, cols=1024, seed=0):
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


@pytest.mark.parametrize("name,legacy,bound", [("Q4_K", "Q4_0", 0.075), ("Q5_K", "Q5_0", 0.038),
                                               ("Q6_K", "Q5_1", 0.019)])
def test_k_type_beats_the_legacy_type_of_its_size(name, legacy, bound):
    """Gaussian weights: the K type's error under the legacy type's at no more
    bits per weight (Q6_K: 6.56 vs Q5_1's 6.0, so a much lower error)."""
    x = _gaussian()
    q = kquants.quantize(x, name)
    block, size = gguf.GGML_QUANT_SIZES[T[name]]
    assert q.dtype == np.uint8 and q.shape == (64, 1024 // block * size)
    ours = _rel_rmse(x, T[name], q)
    theirs = _rel_rmse(x, T[legacy], gguf.quants.quantize(x, T[legacy]))
    assert ours < bound and ours < theirs * (0.9 if name != "Q6_K" else 0.6)


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
def test_values_on_the_grid_come_back_to_f16_rounding(name):
    """A block built as (6-bit scale) x (4/5-bit level) - (6-bit min) per
    32-value sub-block is found again: only the f16 super-scales round."""
    nmax = 15 if name == "Q4_K" else 31
    rng = np.random.default_rng(1)
    d, dmin = 0.01, 0.004
    ls = rng.integers(1, 64, (4, 8))
    ls[:, 0] = 63  # the largest scale sets d, as the quantizer's max does
    lm = rng.integers(0, 64, (4, 8))
    lm[:, 0] = 63
    levels = rng.integers(0, nmax + 1, (4, 8, 32))
    levels[:, :, 0], levels[:, :, 1] = 0, nmax  # each sub-block spans its range
    x = (d * ls[..., None] * levels - dmin * lm[..., None]).astype(np.float32).reshape(4, 256)
    back = gguf.quants.dequantize(kquants.quantize(x, name), T[name])
    assert np.abs(back - x).max() <= 2e-3 * np.abs(x).max()


def test_q6_k_on_the_grid_comes_back_to_f16_rounding():
    rng = np.random.default_rng(2)
    sc = rng.integers(-128, 128, (4, 16))
    sc[:, 0] = -128  # the scale of largest magnitude: llama.cpp's -128 / max
    levels = rng.integers(-32, 32, (4, 16, 16))
    levels[:, :, 0] = -32
    x = (0.001 * sc[..., None] * levels).astype(np.float32).reshape(4, 256)
    back = gguf.quants.dequantize(kquants.quantize(x, "Q6_K"), T.Q6_K)
    assert np.abs(back - x).max() <= 2e-3 * np.abs(x).max()


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_zero_constant_and_outlier_blocks(name):
    x = _gaussian(rows=3, cols=512)
    x[0, :256] = 0  # an all-zero block comes back exactly zero
    x[1, 256:] = 0.75  # a constant block
    x[2, 7] = 5.0  # one outlier per block: the others keep their sub-blocks' scales
    back = gguf.quants.dequantize(kquants.quantize(x, name), T[name])
    assert np.all(back[0, :256] == 0) and np.isfinite(back).all()
    assert np.abs(back[1, 256:] - 0.75).max() < 2e-3
    assert abs(back[2, 7] - 5.0) < 0.05 * 5.0
    rest = np.abs(back[2, 32:256] - x[2, 32:256]).mean() / np.abs(x[2, 32:256]).mean()
    assert rest < 0.15


def test_shape_and_refusal():
    x = _gaussian(rows=6, cols=512).reshape(2, 3, 512)
    assert kquants.quantize(x, "Q4_K").shape == (2, 3, 2 * 144)
    with pytest.raises(ValueError, match="256"):
        kquants.quantize(np.zeros((2, 320), np.float32), "Q4_K")


def _ggml_quantizer():
    """llama.cpp's ``ggml_quantize_chunk`` from the libraries llama-cpp-python ships."""
    import ctypes
    from pathlib import Path

    llama_cpp = pytest.importorskip("llama_cpp")
    libs = sorted(Path(llama_cpp.__file__).parent.glob("lib/libggml-base.*")) or \
        sorted(Path(llama_cpp.__file__).parent.glob("lib/libggml.*"))
    if not libs:
        pytest.skip("llama-cpp-python ships no libggml here")
    lib = ctypes.CDLL(str(libs[0]))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(x: np.ndarray, qtype) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        out = np.zeros((x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
        fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out

    return quantize


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_bytes_equal_llama_cpp_quantizer(name):
    """Where llama-cpp-python is installed: llama.cpp's own quantizer (what
    llama-quantize runs without an importance matrix) writes the same bytes,
    block for block, on Gaussian rows, heavy tails, zero and constant blocks."""
    theirs_fn = _ggml_quantizer()
    x = _gaussian(rows=256, cols=1024, seed=3)
    x[5] *= np.random.default_rng(4).standard_t(2, 1024).astype(np.float32)  # heavy tails
    x[6, :256], x[7, :256] = 0.0, 0.5
    ours, theirs = kquants.quantize(x, name), theirs_fn(x, T[name])
    size = gguf.GGML_QUANT_SIZES[T[name]][1]
    same = (ours.reshape(-1, size) == theirs.reshape(-1, size)).all(axis=1)
    assert same.all(), f"{same.mean():.4f} of blocks equal"
