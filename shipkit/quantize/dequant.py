"""Dequantizers: GGML blocks -> float32, vectorised in numpy, the float ops of ggml's
dequantize_row_* (so the values equal llama.cpp's, and gguf-py's where it has one)."""

from __future__ import annotations

import numpy as np

from shipkit.errors import IntegrityError
from shipkit.quantize import formats as fmt
from shipkit.quantize.formats import QType


def _half(raw: np.ndarray) -> np.ndarray:
    """(nb, 2) uint8 -> (nb, 1) float32 from little-endian float16."""
    return raw.copy().view("<f2").astype(np.float32)


def _q5_levels(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    high = qh.copy().view("<u4")  # (nb, 1)
    bits = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    low = np.concatenate([qs & 0xF, qs >> 4], axis=1)
    return (low | (bits << 4)).astype(np.float32)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    return blocks[:, 2:].view(np.int8).astype(np.float32) * _half(blocks[:, :2])


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    return (_q5_levels(blocks[:, 2:6], blocks[:, 6:]) - 16) * _half(blocks[:, :2])


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    return _q5_levels(blocks[:, 4:8], blocks[:, 8:]) * _half(blocks[:, :2]) + _half(blocks[:, 2:4])


def _scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nb, 12) -> two (nb, 8) uint8 arrays of 6-bit scales and mins."""
    first, second, third = packed[:, :4], packed[:, 4:8], packed[:, 8:]
    scales = np.concatenate([first & 63, (third & 0xF) | ((first >> 6) << 4)], axis=1)
    mins = np.concatenate([second & 63, (third >> 4) | ((second >> 6) << 4)], axis=1)
    return scales, mins


def _kquant_values(blocks: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """y = (d*scale) * level - (dmin*min) per 32-weight group; levels (nb, 8, 32)."""
    scales, mins = _scales_mins(blocks[:, 4:16])
    d = _half(blocks[:, :2]) * scales.astype(np.float32)
    m = _half(blocks[:, 2:4]) * mins.astype(np.float32)
    return (d[:, :, None] * levels.astype(np.float32) - m[:, :, None]).reshape(-1, fmt.QK_K)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    levels = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)
    return _kquant_values(blocks, levels)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    qh = blocks[:, 16:48].reshape(-1, 1, 32)
    qs = blocks[:, 48:].reshape(-1, 4, 1, 32)
    low = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)
    high = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    return _kquant_values(blocks, low | (high << 4))


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    ql = blocks[:, :128].reshape(-1, 2, 2, 32)  # (nb, half, first/second 32, l)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # k = 0,1 low nibbles; 2,3 high
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    levels = (low | (high << 4)).astype(np.int16) - 32  # (nb, 2, 4, 32): weight 128h + 32k + l
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 2, 4, 2)
    d = _half(blocks[:, 208:210]).reshape(-1, 1, 1, 1) * scales  # sub-block of 16: l // 16
    values = d[..., None] * levels.reshape(-1, 2, 4, 2, 16).astype(np.float32)
    return values.reshape(-1, fmt.QK_K)


DEQUANTIZERS = {
    QType.Q8_0: dequantize_q8_0,
    QType.Q5_0: dequantize_q5_0,
    QType.Q5_1: dequantize_q5_1,
    QType.Q4_K: dequantize_q4_k,
    QType.Q5_K: dequantize_q5_k,
    QType.Q6_K: dequantize_q6_k,
}


def dequantize(data: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes of `qtype` blocks (any uint8 array) -> float32 array of `shape`."""
    if qtype == QType.F32:
        return np.ascontiguousarray(data).view(np.float32).reshape(shape)
    if qtype == QType.F16:
        return np.ascontiguousarray(data).view(np.float16).astype(np.float32).reshape(shape)
    if qtype not in DEQUANTIZERS:
        raise IntegrityError(f"GGML type {qtype.name} is not supported (F32, F16, Q8_0, Q5_0, "
                             "Q5_1, Q4_K, Q5_K, Q6_K are)")
    layout = fmt.BLOCK_LAYOUTS[qtype]
    blocks = np.ascontiguousarray(data).reshape(-1, layout.nbytes)
    return DEQUANTIZERS[qtype](blocks).reshape(shape)
