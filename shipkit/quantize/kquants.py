"""`quantize`: every quant type's bytes as llama.cpp writes them, from the fastest code that
gives them here; `backend` says which that is.

- `kquant_rows` (C compiled at run time, on the CPU): the k-quants Q2_K ... Q6_K, with and
  without an importance vector;
- `torch_quants` (torch, on CPU or CUDA): Q8_0, Q5_0 / Q5_1 without importance, and the
  k-quants without importance on CUDA or where no C compiler works;
- `row_quants.ROW_QUANTIZERS`: every other type.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from shipkit.errors import InputError
from shipkit.quantize import formats as fmt
from shipkit.quantize import kquant_rows, native_search, torch_quants
from shipkit.quantize.row_quants import ROW_QUANTIZERS
from shipkit.quantize.torch_quants import BLOCK_QUANTIZERS

USE_KERNELS = True  # False (tests): the torch quantizers on the CPU even where the C builds
CHUNK_WEIGHTS = {"cpu": 1 << 18, "cuda": 1 << 26}  # weights quantized per pass: cache vs launch cost


def _usable_cores() -> int:
    """The cores this process may run on (taskset / cgroup pinning)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def _cpu_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="quantize")


def backend(qtype: fmt.QType, device: str = "cpu", *, importance: bool = False) -> str:
    """Who `quantize` runs for `qtype` on `device`; the bytes are the same every way:
    - "c-rows": kquant_rows' C on the CPU, whatever `device` says: every k-quant on a CPU, and on
      any device Q2_K, Q3_K and the k-quants with importance;
    - "cuda-kernel" / "torch": torch_quants on `device`, its scale search in native_search's CUDA
      kernels / in torch: Q8_0 (ggml ignores its importance), Q5_0 / Q5_1 without importance,
      Q4_K / Q5_K / Q6_K without importance on CUDA or where no C compiler works;
    - "row-quants": ROW_QUANTIZERS, every other type (Q5_0 / Q5_1 with importance among them);
    - "unavailable": a type only the C encodes, where no C compiler works."""
    torch_path = qtype in BLOCK_QUANTIZERS and (not importance or qtype == fmt.QType.Q8_0)
    if qtype in kquant_rows.QTYPES:
        on_cpu = torch.device(device).type == "cpu" and USE_KERNELS
        if kquant_rows.available() and (on_cpu or not torch_path):
            return "c-rows"
        if not torch_path:
            return "unavailable"
    if torch_path:
        uses_search = qtype in kquant_rows.QTYPES and torch.device(device).type == "cuda"
        kernels = uses_search and native_search.available(device) and torch_quants.USE_SEARCH_KERNELS
        return "cuda-kernel" if kernels else "torch"
    return "row-quants"


def quantize(weights: torch.Tensor | np.ndarray, qtype: fmt.QType, *, device: str = "cpu",
             importance: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """Encode float weights -> uint8 array of the blocks' bytes, row after row, as
    ggml_quantize_chunk (and so llama-quantize) writes them; `backend` says who encodes.

    `weights`: (n_rows, n_cols) (or 1-D: one row; n_cols a whole number of blocks), any float
    dtype, torch or numpy. `importance`: float32 (n_cols,), the tensor's imatrix entry, applied
    to every row as ggml does, or None. `threads`: CPU threads (default: one per usable core).
    Raises InputError for an importance of the wrong shape, rows that are not whole blocks, or a
    type that needs the compiled C where no C compiler works.
    """
    values = torch.as_tensor(weights)
    rows = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values.reshape(1, -1)
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (rows.shape[1],):
            raise InputError(f"{qtype.name}: importance of shape {importance.shape} for rows of "
                             f"{rows.shape[1]} columns; it needs one value per column")
    threads = threads or _usable_cores()
    route = backend(qtype, device, importance=importance is not None)
    if route == "c-rows":
        return _native_rows(rows, qtype, importance, threads)
    if route in ("cuda-kernel", "torch"):
        return _torch_blocks(rows, qtype, device, threads)
    if route == "unavailable":
        raise InputError(f"{qtype.name}{' with importance' if importance is not None else ''}: "
                         "its quantizer is C compiled at run time and no C compiler worked "
                         "(install gcc or set $CC) on this x86-64 host")
    if qtype not in ROW_QUANTIZERS:
        raise InputError(f"{qtype.name}: shipkit has no quantizer for this GGML type")
    return ROW_QUANTIZERS[qtype](rows.to(device="cpu", dtype=torch.float32).numpy(), importance).reshape(-1)


def _whole_blocks(rows: torch.Tensor, qtype: fmt.QType) -> fmt.BlockLayout:
    layout = fmt.BLOCK_LAYOUTS[qtype]
    if rows.shape[1] % layout.weights:
        raise InputError(f"{qtype.name}: rows of {rows.shape[1]} weights are not whole blocks "
                         f"of {layout.weights}")
    return layout


def _native_rows(rows: torch.Tensor, qtype: fmt.QType, importance: np.ndarray | None,
                 threads: int) -> np.ndarray:
    """kquant_rows' C over chunks of whole rows, one chunk per call, the calls on `threads`
    threads; each chunk is converted to float32 in its thread."""
    layout = _whole_blocks(rows, qtype)
    n_rows, n_cols = rows.shape
    out = np.empty((n_rows, n_cols // layout.weights * layout.nbytes), dtype=np.uint8)
    step = max(1, CHUNK_WEIGHTS["cpu"] // n_cols)

    def run(start: int) -> None:
        chunk = rows[start:start + step].to(device="cpu", dtype=torch.float32).contiguous().numpy()
        kquant_rows.quantize_rows(chunk, qtype, importance, out[start:start + chunk.shape[0]])

    list(_cpu_pool(threads).map(run, range(0, n_rows, step)))
    return out.reshape(-1)


def _torch_blocks(rows: torch.Tensor, qtype: fmt.QType, device: str, threads: int) -> np.ndarray:
    """The torch quantizers over chunks of whole blocks: on CPU in a thread pool, single-threaded
    torch ops each (its intra-op threads cost more than they give on a busy machine)."""
    layout = _whole_blocks(rows, qtype)
    blocks = rows.reshape(-1, layout.weights)
    kind = torch.device(device).type
    step = max(1, CHUNK_WEIGHTS[kind] // layout.weights)
    out = np.empty((blocks.shape[0], layout.nbytes), dtype=np.uint8)
    encode = BLOCK_QUANTIZERS[qtype]

    @torch.inference_mode()
    def run(start: int) -> None:
        chunk = blocks[start:start + step].to(device=device, dtype=torch.float32)
        out[start:start + chunk.shape[0]] = encode(chunk).cpu().numpy()

    starts = range(0, blocks.shape[0], step)
    if kind != "cpu":
        for start in starts:
            run(start)
        return out.reshape(-1)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        list(_cpu_pool(threads).map(run, starts))
    finally:
        torch.set_num_threads(torch_threads)
    return out.reshape(-1)
