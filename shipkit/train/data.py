"""Batches for training: a wrapping, shuffled train stream, the fixed validation set, and the
share of the train split a run trains on (`train_fraction`).

The stream and the validation set cut a split into windows of `seq_len + 1` tokens (inputs and
their next-token targets) inside each shard, starting every `seq_len` tokens; the few tokens at a
shard's end that do not fill a window are not used. The train stream visits every window once per pass in an order fixed
by (seed, pass number), then wraps around and starts the next pass; `cursor` (windows consumed,
all ranks together) is its whole state, so resuming is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shipkit.errors import TrainingError

# A train_fraction keeps whole blocks of this many contiguous windows: stretches of real text
# (2,048 tokens at seq_len 128), and few enough slices even for a billion-token split.
SUBSET_BLOCK_WINDOWS = 16
SUBSET_SEED_WORD = 1 << 62  # beside the seed, a word no pass number reaches (passes use [seed, pass])


class EmptyStreamError(TrainingError):
    """A split has too few tokens for a single window; the evidence records `empty-stream`."""


class Windows:
    """The `seq_len + 1`-token windows of a split's shards, addressed 0..count-1."""

    def __init__(self, shards: Sequence[np.ndarray], seq_len: int) -> None:
        self.shards = list(shards)
        self.seq_len = seq_len
        per_shard = [max(0, (len(shard) - 1) // seq_len) for shard in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(per_shard, dtype=np.int64)])
        self.count = int(self.starts[-1])

    def get(self, indices: np.ndarray) -> torch.Tensor:
        """(len(indices), seq_len + 1) int64 tokens."""
        rows = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        shard_ids = np.searchsorted(self.starts, indices, side="right") - 1
        for row, (index, shard_id) in enumerate(zip(indices, shard_ids, strict=True)):
            offset = (int(index) - int(self.starts[shard_id])) * self.seq_len
            rows[row] = self.shards[shard_id][offset : offset + self.seq_len + 1]
        return torch.from_numpy(rows)


class TrainStream:
    """Endless shuffled batches of train windows; pass p uses permutation rng([seed, p])."""

    def __init__(
        self,
        shards: Sequence[np.ndarray],
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        cursor: int = 0,
    ) -> None:
        self.windows = Windows(shards, seq_len)
        if self.windows.count == 0:
            total = sum(len(shard) for shard in shards)
            raise EmptyStreamError(
                f"the train split has {total} tokens in {len(shards)} shard(s), "
                f"fewer than one window of seq_len + 1 = {seq_len + 1} in any shard; "
                "use more data or a smaller seq_len"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.cursor = cursor
        self._pass_index = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def wraps(self) -> float:
        """Passes over the train split so far (all ranks together)."""
        return self.cursor / self.windows.count

    def _order_of_pass(self, pass_index: int) -> np.ndarray:
        if pass_index != self._pass_index:
            rng = np.random.default_rng([self.seed, pass_index])
            self._order = rng.permutation(self.windows.count)
            self._pass_index = pass_index
        return self._order

    def _window_ids(self, start: int, count: int) -> np.ndarray:
        ids = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            pass_index, position = divmod(start + filled, self.windows.count)
            order = self._order_of_pass(pass_index)
            take = min(count - filled, self.windows.count - position)
            ids[filled : filled + take] = order[position : position + take]
            filled += take
        return ids

    def next_batch(self) -> torch.Tensor:
        """This rank's (batch_size, seq_len + 1) slice of the next global batch."""
        start = self.cursor + self.rank * self.batch_size
        batch = self.windows.get(self._window_ids(start, self.batch_size))
        self.cursor += self.batch_size * self.world_size
        return batch


def validation_windows(
    shards: Sequence[np.ndarray], seq_len: int, val_tokens: int
) -> torch.Tensor:
    """The fixed validation set: ceil(val_tokens / seq_len) windows spread evenly over the split
    (all of them if it has fewer), as a (K, seq_len + 1) tensor — the same on every call."""
    windows = Windows(shards, seq_len)
    if windows.count == 0:
        total = sum(len(shard) for shard in shards)
        raise EmptyStreamError(
            f"the val split has {total} tokens, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1}; use a larger val split or a smaller seq_len"
        )
    wanted = min(windows.count, -(-val_tokens // seq_len))
    indices = np.unique(np.linspace(0, windows.count - 1, wanted).round().astype(np.int64))
    return windows.get(indices)


def train_subset(shards: Sequence[np.ndarray], seq_len: int, fraction: float, seed: int) -> list[np.ndarray]:
    """The stretches of the train split a run trains on: all of it at fraction 1, else a seeded
    random `fraction` of its blocks of SUBSET_BLOCK_WINDOWS windows (views, in split order), so
    a smaller corpus is a random sample of the same text, the val split untouched."""
    if fraction == 1.0:
        return list(shards)
    block_tokens = SUBSET_BLOCK_WINDOWS * seq_len
    blocks = [(number, start) for number, shard in enumerate(shards)
              for start in range(0, len(shard) - seq_len, block_tokens)]  # each holds a window
    if not blocks:
        return list(shards)  # no window at all: the stream stops the run as empty-stream
    keep = max(1, round(fraction * len(blocks)))
    chosen = np.random.default_rng([seed, SUBSET_SEED_WORD]).choice(len(blocks), keep, replace=False)
    return [shards[number][start : start + block_tokens + 1]
            for number, start in (blocks[index] for index in sorted(chosen))]
