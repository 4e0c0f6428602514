"""What a document's text goes through: UTF-8 decoding with the undecodable bytes counted,
normalisation, the document bounds, the content hash and the train/val split rule.

Because the split is a pure function of (seed, document sha256) and the builder removes
duplicates first, the same text can never sit on both sides, whatever order the sources come in.
"""

from __future__ import annotations

import codecs
import hashlib
import re

from shipkit.corpus.format import (
    LONG_LINES,
    MAX_DOCUMENT_BYTES,
    MAX_LINE_CHARS,
    TOO_LARGE,
)

SPLIT_RULE = "val iff int.from_bytes(sha256(f'{seed}:{doc_sha256}').digest()[:8], 'big') / 2**64 < val_fraction"

_REPLACEMENT = "\ufffd"
_SURROGATES = re.compile("[\ud800-\udfff]")
_ERROR_HANDLER = "shipkit.count-replace"


class _ReplacementCounter:
    """A codecs error handler that replaces like errors="replace" and counts the bytes replaced."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, error: UnicodeError) -> tuple[str, int]:
        if not isinstance(error, UnicodeDecodeError):
            raise error
        self.count += error.end - error.start
        return _REPLACEMENT, error.end


_counter = _ReplacementCounter()
codecs.register_error(_ERROR_HANDLER, _counter)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing each undecodable sequence with U+FFFD; return (text, bytes replaced)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        before = _counter.count
        text = data.decode("utf-8", errors=_ERROR_HANDLER)
        return text, _counter.count - before


def normalise(text: str) -> tuple[str, int]:
    """Drop a leading BOM, turn CRLF into LF, replace lone surrogates; return (text, replaced)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.replace("\r\n", "\n")
    text, surrogates = _SURROGATES.subn(_REPLACEMENT, text)
    return text, surrogates


def oversize(text: str) -> str | None:
    """TOO_LARGE or LONG_LINES when `text` is past a document bound, else None. Measured on the
    text as decoded (U+FFFD takes 3 bytes), so what `build_corpus` keeps `iter_texts` accepts."""
    # surrogatepass: a lone surrogate (from a JSON escape) is replaced later, by as many bytes
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        return TOO_LARGE
    if max(map(len, text.split("\n"))) > MAX_LINE_CHARS:
        return LONG_LINES
    return None


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_val(doc_sha256: str, seed: int, val_fraction: float) -> bool:
    """The split rule (SPLIT_RULE): a uniform draw fixed by the seed and the document's hash."""
    digest = hashlib.sha256(f"{seed}:{doc_sha256}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
