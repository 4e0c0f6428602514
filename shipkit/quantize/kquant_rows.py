"""llama.cpp's k-quant row quantizers, Q2_K ... Q6_K with and without an importance vector, as C
compiled at run time by `native_build`: `kquant_search.c` (ggml's searches) then `kquant_rows.c`
(the formats), one source after the shared `ggml_prelude.h`.

One call encodes a run of whole rows with the bytes of ggml_quantize_chunk: quantize_row_*_ref
without importance, quantize_row_*_impl with it, in ggml's float32 arithmetic. The C runs the
searches of a super-block's groups side by side, so gcc vectorises them (see the source's
header); the caller spreads row chunks over threads (ctypes drops the GIL during a call).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from shipkit.quantize.formats import QType
from shipkit.quantize.native_build import load_c_library

QTYPES = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)
SOURCES = tuple(Path(__file__).with_name(name) for name in ("kquant_search.c", "kquant_rows.c"))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled quantizers, or None where no C compiler works (see native_build)."""
    loaded = load_c_library(SOURCES, "kquant-rows")
    if loaded is not None:
        pointer = ctypes.c_void_p
        loaded.quantize_rows.restype = ctypes.c_long
        loaded.quantize_rows.argtypes = [ctypes.c_int, pointer, pointer, pointer, ctypes.c_long,
                                         ctypes.c_long]
    return loaded


def available() -> bool:
    return library() is not None


def quantize_rows(rows: np.ndarray, qtype: QType, importance: np.ndarray | None,
                  out: np.ndarray) -> None:
    """Encode `rows` (float32 (n_rows, n_cols), C order, n_cols a multiple of 256) into `out`
    (uint8 (n_rows, row bytes), C order); `importance` float32 (n_cols,) or None. The caller
    checks shapes and that `library()` exists."""
    weights = None if importance is None else importance.ctypes.data
    written = library().quantize_rows(int(qtype), rows.ctypes.data, weights, out.ctypes.data,
                                      rows.shape[0], rows.shape[1])
    if written != out.nbytes:  # a type or shape the C does not know: a caller's bug
        raise ValueError(f"kquant_rows wrote {written} bytes of {qtype.name}, expected {out.nbytes}")
