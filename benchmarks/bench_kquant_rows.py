"""Row-level speed of the k-quants: shipkit's `kquants.quantize` against ggml_quantize_chunk (the
function llama-quantize calls per chunk of rows, from llama-cpp-python's libggml-base), on the
same random rows with the same number of threads, with and without an importance vector; and
whether the bytes are identical.

ggml's side is driven as llama-quantize drives it: chunks of at least 32*512 weights handed to
`threads` workers (ctypes drops the GIL, so the workers run in parallel). Each figure is the best
of `--repeat` runs; weights/s counts input weights.

    python benchmarks/bench_kquant_rows.py                      # 1 and 2 threads, every k-quant
    python benchmarks/bench_kquant_rows.py --threads 1 --types Q4_K --json-out rows.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shipkit.quantize import kquants  # noqa: E402
from shipkit.quantize.formats import BLOCK_LAYOUTS, QType  # noqa: E402

KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
LLAMA_MIN_CHUNK = 32 * 512  # llama-quantize's smallest chunk of weights per ggml call


def ggml_library(path: str | None = None) -> ctypes.CDLL:
    """libggml-base: `path`, else llama-cpp-python's."""
    if path is None:
        import llama_cpp

        path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    library = ctypes.CDLL(path)
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return library


def ggml_quantize(library: ctypes.CDLL, rows: np.ndarray, qtype: QType, importance: np.ndarray | None,
                  pool: ThreadPoolExecutor) -> np.ndarray:
    """ggml_quantize_chunk over chunks of whole rows on the pool's threads, as llama-quantize does."""
    n_rows, n_cols = rows.shape
    layout = BLOCK_LAYOUTS[qtype]
    row_bytes = n_cols // layout.weights * layout.nbytes
    out = np.empty((n_rows, row_bytes), dtype=np.uint8)
    weights = None if importance is None else importance.ctypes.data
    step = max(1, -(-LLAMA_MIN_CHUNK // n_cols))

    def run(start: int) -> None:
        count = min(step, n_rows - start)
        library.ggml_quantize_chunk(int(qtype), rows[start].ctypes.data, out[start].ctypes.data, 0, count,
                                    n_cols, weights)

    list(pool.map(run, range(0, n_rows, step)))
    return out


def best_seconds(action, repeat: int) -> tuple[float, np.ndarray]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = action()
        best = min(best, time.perf_counter() - started)
    return best, result


def compare(rows: np.ndarray, qtype: QType, importance: np.ndarray | None, threads: int, *,
            library: ctypes.CDLL, repeat: int = 3) -> dict:
    """One line of the table: weights/s of shipkit and of ggml, their ratio, identical bytes."""
    pool = ThreadPoolExecutor(max_workers=threads)
    kquants.quantize(rows[:8], qtype, importance=importance, threads=threads)  # build / load the C once
    ours_s, ours = best_seconds(lambda: kquants.quantize(rows, qtype, importance=importance, threads=threads),
                                repeat)
    ggml_s, theirs = best_seconds(lambda: ggml_quantize(library, rows, qtype, importance, pool), repeat)
    pool.shutdown()
    return {"type": qtype.name, "importance": importance is not None, "threads": threads,
            "shipkit_weights_per_s": rows.size / ours_s, "ggml_weights_per_s": rows.size / ggml_s,
            "ratio": ggml_s / ours_s, "identical": bool(np.array_equal(ours, theirs.reshape(-1))),
            "backend": kquants.backend(qtype, importance=importance is not None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--types", nargs="+", default=list(KQUANTS), choices=KQUANTS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ggml-lib", help="libggml-base.so (default: llama-cpp-python's)")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    importance = (10.0 ** rng.uniform(-3, 2, args.cols)).astype(np.float32)
    library = ggml_library(args.ggml_lib)
    results = []
    print(f"{args.rows} x {args.cols} rows, best of {args.repeat}; M weights/s")
    print(f"{'type':6} {'imatrix':8} {'threads':>7} {'shipkit':>9} {'ggml':>9} {'ratio':>6}  bytes")
    for name in args.types:
        for weights in (None, importance):
            for threads in args.threads:
                line = compare(rows, QType[name], weights, threads, library=library, repeat=args.repeat)
                results.append(line)
                print(f"{name:6} {'yes' if line['importance'] else 'no':8} {threads:>7} "
                      f"{line['shipkit_weights_per_s'] / 1e6:>9.1f} {line['ggml_weights_per_s'] / 1e6:>9.1f} "
                      f"{line['ratio']:>5.2f}x  {'identical' if line['identical'] else 'DIFFER'}", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": args.rows, "cols": args.cols, "results": results},
                                                  indent=2))


if __name__ == "__main__":
    main()
