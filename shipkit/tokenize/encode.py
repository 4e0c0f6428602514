"""`encode_corpus`: both splits of a corpus folder through a tokenizer into `.tok` shards and
manifest.json (`docs/tokens-format.md`).

Every document is preceded by the tokenizer's document separator (its end-of-text token), so a
shard reads `EOT doc EOT doc ...` and holds as many EOTs as documents; a shard never cuts a
document.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from shipkit.corpus import CORPUS_MANIFEST, iter_texts, read_corpus_manifest
from shipkit.fsutil import make_out_dir, sha256_file, write_json
from shipkit.layout import TOKENIZER_FILE
from shipkit.tokenize.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SPLITS,
    ShardInfo,
    ShardWriter,
    shard_name,
    token_dtype,
)
from shipkit.tokenize.tokenizer import copy_tokenizer, id_space, load_tokenizer
from shipkit.tokenizer_contract import read_contract


@dataclass
class EncodeConfig:
    shard_tokens: int = 1 << 28  # a shard holds at most this many tokens (one larger doc excepted)
    # Text handed to one encode_batch call: bounds memory; larger batches cost the same CPU time
    # on the stdlib corpus (measured 1-16 MiB) but hold more Encoding objects at once.
    batch_bytes: int = 1 << 20


def _batches(texts: Iterable[str], batch_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _eot_separated(encodings: list, dtype: np.dtype, separator_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens `EOT doc EOT doc ...`, end offset of each document in them)."""
    lengths = np.fromiter((len(encoding.ids) + 1 for encoding in encodings), dtype=np.int64,
                          count=len(encodings))
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]), dtype=dtype)
    for encoding, end, length in zip(encodings, ends, lengths, strict=True):
        start = end - length
        tokens[start] = separator_id
        tokens[start + 1 : end] = encoding.ids
    return tokens, ends


def _encode_ahead(tokenizer: Tokenizer, batches: Iterator[list[str]]) -> Iterator[list]:
    """Encodings of each batch, in order. encode_batch_fast releases the GIL, so batch k is
    encoded in a worker thread while the caller writes batch k-1 and reads batch k+1."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            submitted = pool.submit(tokenizer.encode_batch_fast, batch, add_special_tokens=False)
            if pending is not None:
                yield pending.result()
            pending = submitted
        if pending is not None:
            yield pending.result()


class _SplitEncoder:
    """Streams one split into shards of at most `shard_tokens`, never cutting a document."""

    def __init__(self, tokens_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.tokens_dir = tokens_dir
        self.split = split
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self.writer: ShardWriter | None = None

    def add(self, tokens: np.ndarray, ends: np.ndarray) -> None:
        """Append EOT-separated documents; `ends[i]` is where document i ends in `tokens`."""
        start_doc = 0
        while start_doc < len(ends):
            if self.writer is None:
                self.writer = ShardWriter(self.tokens_dir / shard_name(self.split, len(self.shards)), self.dtype)
            offset = int(ends[start_doc - 1]) if start_doc else 0
            room = self.shard_tokens - self.writer.tokens
            fit = int(np.searchsorted(ends[start_doc:] - offset, room, side="right"))
            if fit == 0 and self.writer.tokens == 0:
                fit = 1
            if fit:
                end_doc = start_doc + fit
                self.writer.write_docs(tokens[offset : int(ends[end_doc - 1])], fit)
                start_doc = end_doc
            if start_doc < len(ends):
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.shards.append(self.writer.close())
            self.writer = None

    def abort(self, error: BaseException) -> None:
        if self.writer is not None:
            self.writer.abort(error)
            self.writer = None


def encode_corpus(
    corpus_dir: str | os.PathLike[str],
    tokens_dir: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    config: EncodeConfig | None = None,
) -> dict:
    """Encode both splits of `corpus_dir` into `tokens_dir`; return the manifest written.

    The tokenizer defaults to `tokens_dir/tokenizer.json`; another one is copied there first,
    with its companion files (tokenizer_config.json, ...). Documents are separated by the
    tokenizer's own end-of-text token (`TokenizerContract.separator_id`). Memory stays bounded by
    `config.batch_bytes` of text and its tokens; encode_batch runs on
    every core (set TOKENIZERS_PARALLELISM=false or RAYON_NUM_THREADS to limit it).
    """
    config = config or EncodeConfig()
    corpus_dir, tokens_dir = Path(corpus_dir), Path(tokens_dir)
    make_out_dir(tokens_dir, "tokens_dir")
    corpus = read_corpus_manifest(corpus_dir)
    # Shards are about to be replaced: a run that dies half-way must not leave an old manifest
    # describing them.
    (tokens_dir / MANIFEST_NAME).unlink(missing_ok=True)
    target = tokens_dir / TOKENIZER_FILE
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != target.resolve():
        load_tokenizer(tokenizer_path)
        copy_tokenizer(Path(tokenizer_path), tokens_dir)
    tokenizer = load_tokenizer(target)
    separator_id = read_contract(target).separator_id
    # A document that spells out "<|endoftext|>" must not produce a document boundary.
    tokenizer.encode_special_tokens = True
    vocab_size = id_space(tokenizer)
    dtype = token_dtype(vocab_size)
    splits = {}
    for split in SPLITS:
        encoder = _SplitEncoder(tokens_dir, split, dtype, config.shard_tokens)
        progress = tqdm(total=corpus["splits"][split]["docs"], desc=f"encode {split}", unit="doc", disable=None)
        try:
            for encodings in _encode_ahead(tokenizer, _batches(iter_texts(corpus_dir, split), config.batch_bytes)):
                encoder.add(*_eot_separated(encodings, dtype, separator_id))
                progress.update(len(encodings))
        except BaseException as error:
            encoder.abort(error)
            raise
        finally:
            progress.close()
        encoder.close()
        splits[split] = {
            "tokens": sum(shard.tokens for shard in encoder.shards),
            "docs": sum(shard.docs for shard in encoder.shards),
            "shards": [shard.to_dict() for shard in encoder.shards],
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": sha256_file(target)},
        "vocab_size": vocab_size,
        "eot_id": separator_id,
        "eot_token": tokenizer.id_to_token(separator_id),
        "dtype": dtype.name,
        "corpus": {"sha256": sha256_file(corpus_dir / CORPUS_MANIFEST), "split": corpus["split"]},
        "splits": splits,
        "total_tokens": sum(info["tokens"] for info in splits.values()),
    }
    keep = {shard["file"] for info in splits.values() for shard in info["shards"]}
    for split in SPLITS:
        for stale in tokens_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].tok"):
            if stale.name not in keep:
                stale.unlink()
    write_json(tokens_dir / MANIFEST_NAME, manifest)
    return manifest
