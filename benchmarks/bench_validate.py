"""Validation speed of APR v2 against the raw speed of its checksum (xxh3-64), same run.

Builds a MODEL-2-shaped checkpoint (hidden 1024, 24 layers, 16/4 heads, FFN 2816, vocab 50257,
untied, f32: ~1.49 GB) in a temporary folder, or takes `--checkpoint FILE`, then times
`validate_apr` on it from the page cache against xxh3 over the same byte ranges, both from the
already-faulted page-cache mapping and from a private in-memory copy; the ratio uses the faster
of the two. Target: ratio >= 0.8. Peak memory ~3 GB (the tensors while writing, then one copy).

    python benchmarks/bench_validate.py [--repeats 5] [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
import datetime
import mmap
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shipkit.apr import inspect_apr, validate_apr, write_apr
from shipkit.apr.format import (
    HEADER_DIGEST_OFFSET,
    HEADER_SIZE,
    checksum,
    header_digest,
)
from shipkit.config import ModelConfig
from shipkit.model import CausalLM

MODEL_2 = ModelConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=4, intermediate_size=2816, vocab_size=50257,
                      tie_word_embeddings=False)
TARGET_RATIO = 0.8


def build_checkpoint(path: Path) -> None:
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in CausalLM(MODEL_2).weights().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.empty(shape).uniform_(-0.05, 0.05, generator=generator)
               for name, shape in shapes.items()}
    write_apr(path, tensors, {"kind": "weights", "config": MODEL_2.to_dict(),
                              "producer": {"shipkit_version": "bench", "source": "synthetic"}})


def interleaved_best(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each run, taking them in turn so that load from other users of the shared
    CPU falls on all of them alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def hash_ranges(buffer: memoryview, data_offset: int, ranges: list[tuple[int, int]]) -> None:
    """What validation hashes: the header and index once, then each tensor once."""
    header_digest(buffer[:HEADER_DIGEST_OFFSET], buffer[HEADER_SIZE:data_offset])
    for start, end in ranges:
        checksum(buffer[start:end])


def measure(path: Path, repeats: int) -> dict[str, float]:
    size = path.stat().st_size
    index = inspect_apr(path)
    ranges = [(info.offset, info.offset + info.nbytes) for info in index.tensors]
    report = validate_apr(path)  # also warms the page cache
    if not report.ok:
        raise SystemExit(f"{path}: {report.problems}")
    copy = bytearray(size)
    with open(path, "rb") as handle:
        handle.readinto(copy)
        mapped = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                           prot=mmap.PROT_READ)
    mapped_view, copy_view = memoryview(mapped), memoryview(copy)
    seconds = interleaved_best({
        "validate": lambda: validate_apr(path),
        "raw_mapped": lambda: hash_ranges(mapped_view, index.data_offset, ranges),
        "raw_copy": lambda: hash_ranges(copy_view, index.data_offset, ranges),
    }, repeats)
    mapped_view.release()
    mapped.close()
    return {"bytes": size, "tensors": len(index.tensors),
            **{name: size / value / 1e9 for name, value in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each; the best counts")
    parser.add_argument("--checkpoint", type=Path,
                        help="validate this file instead of building one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as folder:
        path = args.checkpoint
        if path is None:
            path = Path(folder) / "model-2.apr"
            start = time.perf_counter()
            build_checkpoint(path)
            print(f"built {path.name} in {time.perf_counter() - start:.1f} s")
        figures = measure(path, args.repeats)
    raw = max(figures["raw_mapped"], figures["raw_copy"])
    ratio = figures["validate"] / raw
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs (load {load}), "
          f"Python {platform.python_version()}, "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"checkpoint: {figures['tensors']} tensors, {figures['bytes'] / 1e9:.3f} GB")
    print(f"raw xxh3-64, page-cache map: {figures['raw_mapped']:.2f} GB/s")
    print(f"raw xxh3-64, in-memory copy: {figures['raw_copy']:.2f} GB/s")
    print(f"validate_apr:                {figures['validate']:.2f} GB/s")
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    print(f"ratio to raw: {ratio:.2f} (target >= {TARGET_RATIO}: {verdict})")


if __name__ == "__main__":
    main()
