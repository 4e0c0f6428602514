"""Dequantization: GGML tensor bytes -> float32, by gguf-py (`gguf.quants.dequantize`).

For every type below gguf-py's values equal ggml's own dequantize_row_* (the `to_float` of
libggml-base's type traits) bit for bit — tests/test_row_quants.py compares them on quantized
and on random bytes — so shipkit keeps no dequantizer of its own. Types outside the list are
refused rather than trusted unchecked.
"""

from __future__ import annotations

import gguf.quants
import numpy as np

from shipkit.errors import IntegrityError
from shipkit.quantize.formats import QType

DEQUANTIZABLE = (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q6_K, QType.Q5_K, QType.Q5_1,
                 QType.Q5_0, QType.Q4_K, QType.Q4_1, QType.Q4_0, QType.Q3_K, QType.Q2_K,
                 QType.IQ4_XS, QType.IQ4_NL)


def dequantize(data: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes of `qtype` blocks (any array over them) -> float32 array of `shape`."""
    if qtype not in DEQUANTIZABLE:
        raise IntegrityError(f"GGML type {qtype.name} is not supported "
                             f"({', '.join(supported.name for supported in DEQUANTIZABLE)} are)")
    # One flat run of bytes: given 2-D rows, gguf-py works 16 rows at a time and concatenates,
    # up to twice as slow for the same numbers.
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return gguf.quants.dequantize(flat, qtype).reshape(shape)
