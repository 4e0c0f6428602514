"""Reading a built corpus folder back: corpus.json checked, and each split's texts streamed
from its shards (what the tokenize stage trains and encodes on)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from shipkit.corpus.format import (
    BOUNDS,
    CORPUS_FORMAT,
    CORPUS_MANIFEST,
    MAX_JSONL_LINE_BYTES,
    REBUILD_CORPUS,
    SPLITS,
)
from shipkit.corpus.jsonl import bounded_lines, parse_json
from shipkit.corpus.text import oversize
from shipkit.errors import IntegrityError
from shipkit.fsutil import confined_name, manifest_field, read_format_json


def read_corpus_manifest(corpus_dir: str | os.PathLike[str]) -> dict:
    """corpus.json, with what its readers use checked: each split's `docs` and shard file names."""
    path = Path(corpus_dir) / CORPUS_MANIFEST
    manifest = read_format_json(path, CORPUS_FORMAT, "corpus manifest",
                                  "not a corpus folder; run `shipkit corpus build` first")
    for split in SPLITS:
        manifest_field(manifest, f"splits.{split}.docs", int, path, REBUILD_CORPUS, minimum=0)
        shards = manifest_field(manifest, f"splits.{split}.shards", list, path, REBUILD_CORPUS)
        for index in range(len(shards)):
            name = f"splits.{split}.shards.{index}.file"
            confined_name(manifest_field(manifest, name, str, path, REBUILD_CORPUS), f"{path}: field {name}")
    return manifest


def iter_texts(corpus_dir: str | os.PathLike[str], split: str) -> Iterator[str]:
    """The texts of one split, shard by shard, in the order `corpus build` wrote them.

    Raises IntegrityError naming the shard and line for a line that is not a corpus document or
    holds a document past the bounds `build_corpus` keeps (a hand-edited or older corpus): the
    tokenizer is never handed one."""
    corpus_dir = Path(corpus_dir)
    manifest = read_corpus_manifest(corpus_dir)
    for shard in manifest["splits"][split]["shards"]:
        yield from _shard_texts(corpus_dir / shard["file"])


def _shard_texts(path: Path) -> Iterator[str]:
    if not path.is_file():
        raise IntegrityError(f"{path}: listed in {CORPUS_MANIFEST} but missing or not a regular file; {REBUILD_CORPUS}")
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise IntegrityError(f"{path}: listed in {CORPUS_MANIFEST} but unreadable: {error.strerror}") from None
    with handle:
        for line_number, line in bounded_lines(handle, MAX_JSONL_LINE_BYTES):
            where = f"{path}:{line_number}"
            if line is None:
                raise IntegrityError(f"{where}: a line over {MAX_JSONL_LINE_BYTES:,} bytes; {REBUILD_CORPUS}")
            document = parse_json(line, where, IntegrityError)
            text = document.get("text") if isinstance(document, dict) else None
            if not isinstance(text, str):
                raise IntegrityError(f"{where}: not a corpus document (an object with a \"text\" string)")
            bound = oversize(text)
            if bound:
                raise IntegrityError(f"{where}: a document with {BOUNDS[bound]}, past what `shipkit corpus build` "
                                     f"keeps; {REBUILD_CORPUS}")
            yield text
