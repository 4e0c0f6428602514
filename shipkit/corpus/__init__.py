"""The corpus stage: build a corpus folder from parquet, JSONL and source folders (normalised,
deduplicated, split train/val by content hash) and read it back. Spec: `docs/corpus.md`.

One job per file:
- `format`: the folder's constants: corpus.json, splits, document bounds, skip reasons.
- `text`: decoding, normalisation, the document bounds, the content hash and the split rule.
- `jsonl`: JSON Lines read with a bound on each line (sources and the folder's own shards).
- `sources`: the source readers (folders with their FIFO/symlink/size rules, parquet, JSONL).
- `builder`: `build_corpus` and `CorpusConfig`: dedup, split, the shards and corpus.json.
- `reader`: `read_corpus_manifest` and `iter_texts`, for the stages after it.
"""

from shipkit.corpus.builder import CorpusConfig, build_corpus, skipped_summary
from shipkit.corpus.format import (
    CORPUS_FORMAT,
    CORPUS_MANIFEST,
    MAX_DOCUMENT_BYTES,
    MAX_JSONL_LINE_BYTES,
    MAX_LINE_CHARS,
    SPLITS,
)
from shipkit.corpus.reader import iter_texts, read_corpus_manifest
from shipkit.corpus.sources import TEXT_COLUMNS, default_source
from shipkit.corpus.text import SPLIT_RULE, is_val, text_sha256

__all__ = [
    "CORPUS_FORMAT",
    "CORPUS_MANIFEST",
    "MAX_DOCUMENT_BYTES",
    "MAX_JSONL_LINE_BYTES",
    "MAX_LINE_CHARS",
    "SPLITS",
    "SPLIT_RULE",
    "TEXT_COLUMNS",
    "CorpusConfig",
    "build_corpus",
    "default_source",
    "is_val",
    "iter_texts",
    "read_corpus_manifest",
    "skipped_summary",
    "text_sha256",
]
