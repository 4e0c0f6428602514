"""The corpus folder's constants: corpus.json's name and format, the splits, the document bounds
and the reasons a file or row is skipped (the keys of corpus.json's `skipped`).

Spec of the folder: `docs/corpus.md`.
"""

from __future__ import annotations

CORPUS_FORMAT = "shipkit-corpus/1"
CORPUS_MANIFEST = "corpus.json"
SPLITS = ("train", "val")
REBUILD_CORPUS = "rebuild it with `shipkit corpus build`"

# The Stack's cut-off for source files: past it a file is data, generated or vendored, not code
# to learn from (the stdlib's largest, pydoc_data/topics.py, is 0.76 MB).
MAX_DOCUMENT_BYTES = 1 << 20
# Ten times StarCoder's 1,000-character filter for minified and generated code, so real code
# passes (the stdlib's longest line is 1,181). Byte-level BPE spends ~300 bytes of memory per
# character of a run without whitespace (tokenizers 0.23: a 5 MB line took 1.6 GB to train and
# encode), so one line stays under ~3 MB.
MAX_LINE_CHARS = 10_000
# A JSONL line also holds its row's other columns and JSON escapes (up to 6 bytes a character);
# a longer line is skipped unread, as too large.
MAX_JSONL_LINE_BYTES = 16 * MAX_DOCUMENT_BYTES

# Why a file or row was skipped, the keys of `skipped` in corpus.json.
SPECIAL_FILES, SYMLINKS, TOO_LARGE, LONG_LINES = "special_files", "symlinks", "too_large", "long_lines"
SKIPPED = (SPECIAL_FILES, SYMLINKS, TOO_LARGE, LONG_LINES)
BOUNDS = {TOO_LARGE: f"over {MAX_DOCUMENT_BYTES:,} bytes", LONG_LINES: f"a line over {MAX_LINE_CHARS:,} characters"}

