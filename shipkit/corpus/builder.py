"""`build_corpus`: read the sources, normalise, drop empty documents, remove exact duplicates,
split train/val by each document's content hash, and write the corpus folder: each split's
JSONL shards and corpus.json (`docs/corpus.md`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from shipkit.corpus.format import CORPUS_FORMAT, CORPUS_MANIFEST, SKIPPED, SPLITS
from shipkit.corpus.sources import (
    Document,
    SourceRecord,
    default_source,
    read_source,
    source_kind,
)
from shipkit.corpus.text import SPLIT_RULE, is_val, normalise, text_sha256
from shipkit.errors import InputError
from shipkit.fsutil import atomic_write, make_out_dir, sha256_file, write_json


@dataclass
class CorpusConfig:
    val_fraction: float = 0.02
    seed: int = 0
    text_column: str | None = None  # None: the first of TEXT_COLUMNS present
    glob: str = "*.py"  # files taken from a source folder, searched recursively
    shard_bytes: int = 64 << 20  # a JSONL shard is closed once it holds this many bytes


@dataclass
class SplitWriter:
    """Writes one split's `<split>-NNNNN.jsonl` shards, each closed after `shard_bytes`."""

    out_dir: Path
    split: str
    shard_bytes: int
    shards: list[dict] = field(default_factory=list)
    docs: int = 0
    text_bytes: int = 0
    _context: object = None
    _handle: IO[bytes] | None = None
    _shard_docs: int = 0
    _shard_size: int = 0

    def write(self, text: str, sha256: str, source: str) -> None:
        if self._handle is None:
            name = f"{self.split}-{len(self.shards):05d}.jsonl"
            self._context = atomic_write(self.out_dir / name, "wb")
            self._handle = self._context.__enter__()
            self.shards.append({"file": name})
        line = json.dumps({"text": text, "sha256": sha256, "source": source}, ensure_ascii=False)
        data = (line + "\n").encode("utf-8")
        self._handle.write(data)
        self._shard_docs += 1
        self._shard_size += len(data)
        self.docs += 1
        self.text_bytes += len(text.encode("utf-8"))
        if self._shard_size >= self.shard_bytes:
            self.close()

    def close(self) -> None:
        if self._handle is None:
            return
        self._context.__exit__(None, None, None)
        shard = self.shards[-1]
        shard.update(docs=self._shard_docs, bytes=self._shard_size,
                     sha256=sha256_file(self.out_dir / shard["file"]))
        self._handle = None
        self._shard_docs = self._shard_size = 0

    def abort(self, error: BaseException) -> None:
        if self._handle is not None:
            self._context.__exit__(type(error), error, error.__traceback__)
            self._handle = None

    def summary(self) -> dict:
        return {"docs": self.docs, "bytes": self.text_bytes, "shards": self.shards}


def _remove_stale_shards(out_dir: Path, keep: set[str], suffix: str) -> None:
    for split in SPLITS:
        for path in out_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9]{suffix}"):
            if path.name not in keep:
                path.unlink()


def build_corpus(sources: list[Path], out_dir: Path, config: CorpusConfig | None = None) -> dict:
    """Read `sources` (the stdlib when empty), write the corpus folder, return `corpus.json`.

    Raises InputError for unreadable or malformed input (naming the file, and the line for
    JSONL), for an empty corpus and for a split that ends up empty.
    """
    config = config or CorpusConfig()
    if not 0.0 < config.val_fraction < 1.0:
        raise InputError(f"val_fraction must be between 0 and 1 (exclusive), got {config.val_fraction}")
    paths = [Path(source) for source in sources] or [default_source()]
    records = [SourceRecord(path=str(path), kind=source_kind(path)) for path in paths]
    out_dir = Path(out_dir)
    make_out_dir(out_dir)
    # Shards are about to be replaced: a build that dies half-way must not leave an old
    # corpus.json describing them.
    (out_dir / CORPUS_MANIFEST).unlink(missing_ok=True)
    writers = {split: SplitWriter(out_dir, split, config.shard_bytes) for split in SPLITS}
    seen: set[str] = set()
    counts = {"docs_read": 0, "duplicates_removed": 0, "empty_dropped": 0,
              "undecodable_bytes": 0, "undecodable_docs": 0}
    try:
        for path, record in zip(paths, records, strict=True):
            for document in read_source(path, record, glob=config.glob, text_column=config.text_column):
                record.docs_read += 1
                _add_document(document, config, writers, seen, counts)
    except BaseException as error:
        for writer in writers.values():
            writer.abort(error)
        raise
    for writer in writers.values():
        writer.close()
    _check_not_empty(records, writers, counts, config)
    manifest = _manifest(records, writers, counts, config)
    _remove_stale_shards(out_dir, {s["file"] for w in writers.values() for s in w.shards}, ".jsonl")
    write_json(out_dir / CORPUS_MANIFEST, manifest)
    return manifest


def _add_document(document: Document, config: CorpusConfig, writers: dict[str, SplitWriter],
                  seen: set[str], counts: dict[str, int]) -> None:
    counts["docs_read"] += 1
    text, surrogates = normalise(document.text)
    undecodable = document.undecodable_bytes + surrogates
    if undecodable:
        counts["undecodable_bytes"] += undecodable
        counts["undecodable_docs"] += 1
    if not text.strip():
        counts["empty_dropped"] += 1
        return
    sha256 = text_sha256(text)
    if sha256 in seen:
        counts["duplicates_removed"] += 1
        return
    seen.add(sha256)
    split = "val" if is_val(sha256, config.seed, config.val_fraction) else "train"
    writers[split].write(text, sha256, document.source)


def _check_not_empty(records: list[SourceRecord], writers: dict[str, SplitWriter],
                     counts: dict[str, int], config: CorpusConfig) -> None:
    names = ", ".join(record.path for record in records)
    kept = sum(writer.docs for writer in writers.values())
    if kept == 0:
        raise InputError(
            f"empty corpus: {counts['docs_read']} document(s) read from {names}, "
            f"{counts['empty_dropped']} empty, {counts['duplicates_removed']} duplicate(s), "
            f"{skipped_summary(_skipped_total(records))}; check the paths and glob {config.glob!r}"
        )
    for split, writer in writers.items():
        if writer.docs == 0:
            raise InputError(
                f"the {split} split is empty: {kept} document(s) at val_fraction {config.val_fraction}; "
                "add data or change val_fraction"
            )


def _manifest(records: list[SourceRecord], writers: dict[str, SplitWriter],
              counts: dict[str, int], config: CorpusConfig) -> dict:
    return {
        "format": CORPUS_FORMAT,
        "sources": [asdict(record) for record in records],
        "splits": {split: writer.summary() for split, writer in writers.items()},
        "docs_read": counts["docs_read"],
        "duplicates_removed": counts["duplicates_removed"],
        "empty_dropped": counts["empty_dropped"],
        "undecodable": {"bytes": counts["undecodable_bytes"], "docs": counts["undecodable_docs"]},
        "skipped": _skipped_total(records),
        "split": {"rule": SPLIT_RULE, "val_fraction": config.val_fraction, "seed": config.seed},
        "normalisation": "UTF-8, undecodable bytes -> U+FFFD, leading BOM dropped, CRLF -> LF",
    }


def _skipped_total(records: list[SourceRecord]) -> dict[str, int]:
    return {reason: sum(record.skipped[reason] for record in records) for reason in SKIPPED}


def skipped_summary(skipped: dict[str, int]) -> str:
    """`3 skipped (1 special_files, 2 symlinks)` for corpus.json's `skipped`."""
    reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items() if count)
    return f"{sum(skipped.values())} skipped ({reasons})" if reasons else "0 skipped"
