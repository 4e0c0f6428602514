"""The gate's inputs: held-out val tokens cut into windows, which positions of a window are
scored (the second half, as `llama-perplexity --kl-divergence` scores them; the first half is
context) against which next tokens, and the batches both engines walk the windows in."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shipkit.errors import InputError
from shipkit.tokenize import read_tokens

# Bytes of float32 logits one model's head computes per pass (both models' at once); the metrics'
# float64 softmax temporaries take about 8x this, so on the CPU a 1.5B model's parity stays
# under 2.5 GiB.
LOGIT_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}


@dataclass
class Windows:
    """The evaluated val tokens: `tokens` (n_windows, ctx); logits at positions
    `[score_start, ctx - 1)` are scored against the token that follows each."""

    tokens: np.ndarray
    tokenizer_sha256: str

    @property
    def ctx(self) -> int:
        return self.tokens.shape[1]

    @property
    def score_start(self) -> int:
        return self.ctx // 2

    @property
    def positions_per_window(self) -> int:
        return self.ctx - 1 - self.score_start


def eval_windows(tokens_dir: str | Path, n_tokens: int, ctx: int) -> Windows:
    """The first `n_tokens` (rounded down to whole windows) of the val split, as windows.

    Raises InputError if the split holds fewer than `ctx` tokens or `ctx` is below 4.
    """
    if ctx < 4:
        raise InputError(f"ctx {ctx}: must be at least 4 (half of each window is context)")
    split = read_tokens(tokens_dir, "val")
    n_windows = min(n_tokens, split.total_tokens) // ctx
    if n_windows == 0:
        raise InputError(
            f"{tokens_dir}: the val split has {split.total_tokens} tokens and n_tokens is {n_tokens}; "
            f"parity needs at least one window of ctx {ctx}"
        )
    pieces, remaining = [], n_windows * ctx
    for shard in split.shards:
        pieces.append(np.asarray(shard[:remaining], dtype=np.int64))
        remaining -= len(pieces[-1])
    tokens = np.concatenate(pieces).reshape(n_windows, ctx)
    return Windows(tokens=tokens, tokenizer_sha256=split.tokenizer_sha256)


def eval_batches(windows: Windows, vocab_size: int, device: torch.device) -> Iterator[np.ndarray]:
    """The windows in batches whose float32 logits fit `LOGIT_BUDGET_BYTES` on `device`."""
    per_window = windows.ctx * vocab_size * 4
    size = max(1, LOGIT_BUDGET_BYTES[device.type] // per_window)
    for start in range(0, len(windows.tokens), size):
        yield windows.tokens[start : start + size]


def at_scored_positions(logits: torch.Tensor, windows: Windows) -> torch.Tensor:
    """(B, T, V) -> (B·P, V): the logits of the scored positions."""
    return logits[:, windows.score_start : windows.ctx - 1].reshape(-1, logits.shape[-1])


def scored_targets(batch: np.ndarray, windows: Windows) -> torch.Tensor:
    """(B, T) windows -> (B, P): the true next token of each scored position."""
    return torch.from_numpy(np.ascontiguousarray(batch[:, windows.score_start + 1 :]))
