"""Row quantizers with llama.cpp's bytes, with or without an importance vector: ROW_QUANTIZERS.

`ROW_QUANTIZERS[qtype](rows, importance)`: rows float32 (n_rows, n_cols), importance float32
(n_cols,) or None -> uint8 (n_rows, row_bytes), equal to ggml_quantize_chunk(qtype, rows, ...,
importance) — what llama-quantize writes for a tensor given its imatrix entry.

Who computes what, and why:
- gguf-py (`gguf.quants.quantize`), checked byte for byte against ggml (tests/test_row_quants.py):
  Q8_0 (ggml takes no importance for it) and BF16. Q8_0 differs from ggml only on a block holding
  a NaN, which gguf_export refuses: ggml's MAX drops the NaN from the block's scale, numpy keeps it.
- F16: numpy's float32 -> float16 cast (all gguf-py does) rounds as ggml does; ggml writes every
  NaN as 0x7e00 while numpy keeps its payload, so NaNs are set to ggml's value.
- Q4_0, Q4_1, Q5_0, Q5_1 (with and without importance), IQ4_NL, IQ4_XS: the C in row_quants.c
  (compiled on first use by `native_build`, run over row chunks on every core). gguf-py has no weighted search nor IQ4 quantizer, and
  its Q4_0/Q4_1 store +0 where ggml stores -0 for a block of
  zeros that starts with -0.0 (ggml's running max starts at +0, numpy's argmax takes the -0).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf.quants
import numpy as np

from shipkit.errors import InputError
from shipkit.quantize.formats import BLOCK_LAYOUTS, QType
from shipkit.quantize.native_build import load_c_library

RowQuantizer = Callable[[np.ndarray, np.ndarray | None], np.ndarray]

# Rows per C call: large enough that a call outweighs the thread hand-off, small enough that a
# tensor of a few hundred rows still spreads over every core.
CHUNK_WEIGHTS = 1 << 18
FP16_NAN = 0x7E00  # ggml_compute_fp32_to_fp16's NaN (sign kept)
SOURCE = Path(__file__).with_name("row_quants.c")
KERNELS = ("q4_0_rows", "q4_1_rows", "q5_0_rows", "q5_1_rows", "iq4_nl_rows", "iq4_xs_rows")


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, each `name(rows, importance or NULL, out, n_rows, n_cols)`, or None
    where they cannot be built (see native_build.load_c_library)."""
    loaded = load_c_library([SOURCE], "row-quants")
    if loaded is not None:
        for name in KERNELS:
            getattr(loaded, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2
            getattr(loaded, name).restype = None
    return loaded


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="row-quantize")


def _checked(rows: np.ndarray, importance: np.ndarray | None, qtype: QType
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """Contiguous float32 rows (and importance) whose width is a whole number of blocks."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % BLOCK_LAYOUTS[qtype].weights:
        raise InputError(f"rows of shape {rows.shape}: {qtype.name} needs 2-D rows whose width is a "
                         f"multiple of {BLOCK_LAYOUTS[qtype].weights}")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (rows.shape[1],):
            raise InputError(f"importance of shape {importance.shape}: expected ({rows.shape[1]},), "
                             "one value per column")
    return rows, importance


def _row_bytes(qtype: QType, columns: int) -> int:
    layout = BLOCK_LAYOUTS[qtype]
    return columns // layout.weights * layout.nbytes


def _native(kernel: str, qtype: QType) -> RowQuantizer:
    """A kernel of row_quants.c run over row chunks on every core (ctypes drops the GIL)."""

    def quantize(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        rows, importance = _checked(rows, importance, qtype)
        library = _library()
        if library is None:
            raise InputError(f"{qtype.name}: its quantizer is C compiled at run time and no C "
                             "compiler worked (install gcc or set $CC) on this x86-64 host")
        n_rows, columns = rows.shape
        out = np.empty((n_rows, _row_bytes(qtype, columns)), dtype=np.uint8)
        weights = None if importance is None else importance.ctypes.data
        step = max(1, CHUNK_WEIGHTS // max(columns, 1))

        def run(start: int) -> None:
            count = min(step, n_rows - start)
            getattr(library, kernel)(rows[start].ctypes.data, weights, out[start].ctypes.data,
                                     count, columns)

        list(_pool().map(run, range(0, n_rows, step)))
        return out

    return quantize


def _gguf_py(qtype: QType) -> RowQuantizer:
    """gguf-py's quantizer, for a type whose bytes it gives exactly and whose ggml quantizer
    takes no importance."""

    def quantize(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        rows, _ = _checked(rows, importance, qtype)
        # numpy warns where ggml's float casts go out of range on the same bytes: a scale past
        # float16's range stored as inf, a block of denormals whose inverse scale is inf.
        with np.errstate(over="ignore", invalid="ignore"):
            return gguf.quants.quantize(rows, qtype)

    return quantize


def quantize_f16(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    rows, _ = _checked(rows, importance, QType.F16)
    with np.errstate(over="ignore"):  # beyond float16's range: inf, as ggml writes it
        bits = rows.astype(np.float16).view(np.uint16)
    nan = np.isnan(rows)
    if nan.any():
        bits[nan] = FP16_NAN | (rows.view(np.uint32)[nan] >> 16 & 0x8000)
    return bits.view(np.uint8)


ROW_QUANTIZERS: dict[QType, RowQuantizer] = {
    QType.Q4_0: _native("q4_0_rows", QType.Q4_0),
    QType.Q4_1: _native("q4_1_rows", QType.Q4_1),
    QType.Q5_0: _native("q5_0_rows", QType.Q5_0),
    QType.Q5_1: _native("q5_1_rows", QType.Q5_1),
    QType.Q8_0: _gguf_py(QType.Q8_0),
    QType.BF16: _gguf_py(QType.BF16),
    QType.F16: quantize_f16,
    QType.IQ4_NL: _native("iq4_nl_rows", QType.IQ4_NL),
    QType.IQ4_XS: _native("iq4_xs_rows", QType.IQ4_XS),
}
