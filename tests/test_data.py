"""The train stream (wrapping, counted, rank-sliced, resumable) and the fixed validation set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shipkit.train.data import (
    EmptyStreamError,
    TrainStream,
    Windows,
    validation_windows,
)

SEQ_LEN = 4


def _shards(*lengths: int) -> list[np.ndarray]:
    """Shards whose tokens are their global positions, so windows can be traced back."""
    shards, start = [], 0
    for length in lengths:
        shards.append(np.arange(start, start + length, dtype=np.uint32))
        start += length
    return shards


def _windows_of_pass(stream: TrainStream, batches: int) -> set[tuple[int, ...]]:
    return {tuple(row.tolist()) for _ in range(batches) for row in stream.next_batch()}


def test_windows_are_seq_len_plus_one_consecutive_tokens_inside_a_shard() -> None:
    windows = Windows(_shards(13, 9), SEQ_LEN)
    assert windows.count == 3 + 2
    rows = windows.get(np.arange(windows.count))
    assert rows.shape == (5, SEQ_LEN + 1)
    assert rows.dtype == torch.int64
    assert rows[3].tolist() == [13, 14, 15, 16, 17]
    assert all(torch.equal(row[1:] - row[:-1], torch.ones(SEQ_LEN, dtype=torch.int64)) for row in rows)


def test_one_pass_visits_every_window_exactly_once() -> None:
    shards = _shards(41, 17)
    stream = TrainStream(shards, SEQ_LEN, batch_size=2, seed=1)
    assert stream.windows.count == 14
    seen = _windows_of_pass(stream, 7)
    assert seen == {tuple(row.tolist()) for row in stream.windows.get(np.arange(14))}
    assert stream.wraps == 1.0


def test_stream_wraps_instead_of_running_dry_and_counts_passes() -> None:
    stream = TrainStream(_shards(21), SEQ_LEN, batch_size=3, seed=0)  # 5 windows
    for _ in range(4):
        assert stream.next_batch().shape == (3, SEQ_LEN + 1)
    assert stream.wraps == pytest.approx(12 / 5)


def test_each_pass_has_its_own_order() -> None:
    stream = TrainStream(_shards(401), SEQ_LEN, batch_size=100, seed=3)
    first_pass, second_pass = stream.next_batch(), stream.next_batch()
    assert not torch.equal(first_pass, second_pass)
    assert sorted(map(tuple, first_pass.tolist())) == sorted(map(tuple, second_pass.tolist()))


def test_resuming_from_cursor_continues_the_same_sequence() -> None:
    shards = _shards(97)
    uninterrupted = TrainStream(shards, SEQ_LEN, batch_size=4, seed=5)
    batches = [uninterrupted.next_batch() for _ in range(9)]
    resumed = TrainStream(shards, SEQ_LEN, batch_size=4, seed=5, cursor=4 * 6)
    assert all(torch.equal(resumed.next_batch(), batch) for batch in batches[6:])


def test_ranks_get_disjoint_slices_of_the_global_batch() -> None:
    shards = _shards(4 * 8 + 1)  # 8 windows: one global batch of 2 ranks × 4
    rank_batches = [
        TrainStream(shards, SEQ_LEN, batch_size=4, seed=2, rank=rank, world_size=2).next_batch()
        for rank in (0, 1)
    ]
    rows = [tuple(row.tolist()) for batch in rank_batches for row in batch]
    assert len(set(rows)) == 8
    single = TrainStream(shards, SEQ_LEN, batch_size=8, seed=2).next_batch()
    assert torch.equal(torch.cat(rank_batches), single)


def test_split_shorter_than_one_window_is_an_empty_stream() -> None:
    with pytest.raises(EmptyStreamError, match="train split has 4 tokens"):
        TrainStream(_shards(4), SEQ_LEN, batch_size=1, seed=0)


def test_validation_set_is_identical_on_every_call() -> None:
    shards = _shards(1000, 333)
    assert torch.equal(validation_windows(shards, SEQ_LEN, 64), validation_windows(shards, SEQ_LEN, 64))


def test_validation_set_spreads_over_the_whole_split() -> None:
    shards = _shards(1000, 333)
    windows = validation_windows(shards, SEQ_LEN, 40)
    assert windows.shape == (10, SEQ_LEN + 1)
    assert windows[0, 0] == 0
    assert windows[-1, -1] == 1332  # the last window of the last shard


def test_validation_set_takes_all_windows_of_a_small_split() -> None:
    assert validation_windows(_shards(21), SEQ_LEN, 10_000).shape == (5, SEQ_LEN + 1)


def test_empty_val_split_is_an_empty_stream() -> None:
    with pytest.raises(EmptyStreamError, match="val split"):
        validation_windows([], SEQ_LEN, 100)
