"""Leakage audit of a token folder: how much of the val split the train split already holds.

Two measures, both computed on the token shards the trainer reads:
- exact duplicates: val documents whose token sequence equals a train document's. Byte-level
  BPE is lossless and deterministic, so equal tokens means equal text.
- n-token windows: val windows of `window` tokens (inside one document) that occur anywhere in
  train. Windows are hashed to 64 bits; when train has more windows than `max_train_windows`,
  both sides keep only the windows whose hash falls below the same threshold, so the fraction is
  computed exactly on a hash-defined sample and memory stays bounded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from shipkit.fsutil import write_json
from shipkit.tokenize import TokenSplit, read_tokens

AUDIT_NAME = "audit.json"
# Odd multiplier of the polynomial window hash (the 64-bit golden ratio); splitmix64 then mixes it.
HASH_BASE = np.uint64(0x9E3779B97F4A7C15)
SPLITMIX_1 = np.uint64(0xBF58476D1CE4E5B9)
SPLITMIX_2 = np.uint64(0x94D049BB133111EB)


@dataclass
class AuditConfig:
    window: int = 32
    max_train_windows: int = 1 << 26  # 64M hashes = 512 MiB; above that, windows are sampled
    chunk_tokens: int = 1 << 22  # tokens hashed at a time


def document_digests(shard: np.ndarray, eot_id: int) -> Iterator[int]:
    """A 128-bit hash of each document's tokens (the tokens between EOTs)."""
    boundaries = np.flatnonzero(np.asarray(shard) == eot_id)
    ends = np.append(boundaries[1:], len(shard))
    for start, end in zip(boundaries + 1, ends, strict=True):
        yield xxhash.xxh3_128_intdigest(np.asarray(shard[start:end]).tobytes())


def _mix(hashes: np.ndarray) -> np.ndarray:
    hashes = hashes ^ (hashes >> np.uint64(30))
    hashes = hashes * SPLITMIX_1
    hashes = hashes ^ (hashes >> np.uint64(27))
    hashes = hashes * SPLITMIX_2
    return hashes ^ (hashes >> np.uint64(31))


def window_hashes(tokens: np.ndarray, window: int, eot_id: int) -> np.ndarray:
    """64-bit hashes of every `window`-token run of `tokens` that contains no EOT."""
    tokens = np.asarray(tokens, dtype=np.uint64)
    count = len(tokens) - window + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(window):
            hashes = hashes * HASH_BASE + tokens[offset : offset + count]
        hashes = _mix(hashes)
    eots = np.concatenate([[0], np.cumsum(tokens == eot_id)])
    return hashes[eots[window:] - eots[:count] == 0]


def _split_window_hashes(split: TokenSplit, config: AuditConfig) -> Iterator[np.ndarray]:
    """Window hashes of a split, chunk by chunk; chunks overlap so no window is lost or doubled."""
    step = config.chunk_tokens
    for shard in split.shards:
        for start in range(0, max(len(shard) - config.window + 1, 0), step):
            yield window_hashes(shard[start : start + step + config.window - 1], config.window, split.eot_id)


def audit_tokens(tokens_dir: str | os.PathLike[str], config: AuditConfig | None = None,
                 out: str | os.PathLike[str] | None = None) -> dict:
    """Measure val/train overlap, write it as JSON (default `tokens_dir/audit.json`) and return it."""
    config = config or AuditConfig()
    tokens_dir = Path(tokens_dir)
    train, val = read_tokens(tokens_dir, "train"), read_tokens(tokens_dir, "val")

    train_docs = {digest for shard in train.shards for digest in document_digests(shard, train.eot_id)}
    val_digests = [digest for shard in val.shards for digest in document_digests(shard, val.eot_id)]
    duplicated = sum(digest in train_docs for digest in val_digests)
    del train_docs

    sample_rate = min(1.0, config.max_train_windows / max(train.total_tokens, 1))
    threshold = np.uint64(min(int(sample_rate * 2**64), 2**64 - 1))
    kept = [hashes[hashes <= threshold] for hashes in _split_window_hashes(train, config)]
    train_windows = np.unique(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.uint64)
    del kept
    val_windows = checked = hits = 0
    for hashes in _split_window_hashes(val, config):
        val_windows += len(hashes)
        sampled = hashes[hashes <= threshold]
        checked += len(sampled)
        positions = np.minimum(np.searchsorted(train_windows, sampled), max(len(train_windows) - 1, 0))
        hits += int(np.count_nonzero(train_windows[positions] == sampled)) if len(train_windows) else 0

    report = {
        "tokens_dir": str(tokens_dir),
        "tokenizer_sha256": train.tokenizer_sha256,
        "val_docs": len(val_digests),
        "val_docs_in_train": duplicated,
        "exact_duplicate_fraction": duplicated / max(len(val_digests), 1),
        "window": config.window,
        "val_windows": val_windows,
        "val_windows_checked": checked,
        "val_windows_in_train": hits,
        "window_overlap_fraction": hits / max(checked, 1),
        "train_windows_distinct": len(train_windows),
        "sample_rate": sample_rate,
    }
    write_json(Path(out) if out is not None else tokens_dir / AUDIT_NAME, report)
    return report
