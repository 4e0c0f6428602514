"""Build a corpus folder from parquet, JSONL and source folders: normalise, drop empty
documents, remove exact duplicates, and split train/val by each document's content hash.

Hostile files are skipped and counted per source, never opened or handed on: FIFOs, sockets
and devices, symlinks that dangle, loop or lead out of their source folder, documents over
MAX_DOCUMENT_BYTES and documents with a line over MAX_LINE_CHARS.

Because the split is a pure function of (seed, document sha256) and duplicates are removed
first, the same text can never sit on both sides, whatever order the sources come in.
Format of the folder: `docs/corpus.md`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import stat
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from shipkit.errors import InputError, IntegrityError, ShipkitError
from shipkit.fsutil import (
    atomic_write,
    confined_name,
    make_out_dir,
    manifest_field,
    read_format_json,
    sha256_file,
    write_json,
)

CORPUS_FORMAT = "shipkit-corpus/1"
CORPUS_MANIFEST = "corpus.json"
SPLITS = ("train", "val")
# Tried in this order when no --text-column is given: the names used by common code datasets
# (The Stack, CodeSearchNet, generic text sets).
TEXT_COLUMNS = ("content", "code", "whole_func_string", "func_code_string", "text")
# The stdlib folder also holds third-party installs; those are not the stdlib's own source.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
PARQUET_BATCH_ROWS = 1024
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
REBUILD_CORPUS = "rebuild it with `shipkit corpus build`"
SPLIT_RULE = "val iff int.from_bytes(sha256(f'{seed}:{doc_sha256}').digest()[:8], 'big') / 2**64 < val_fraction"

_REPLACEMENT = "\ufffd"
_SURROGATES = re.compile("[\ud800-\udfff]")
_ERROR_HANDLER = "shipkit.count-replace"


@dataclass
class CorpusConfig:
    val_fraction: float = 0.02
    seed: int = 0
    text_column: str | None = None  # None: the first of TEXT_COLUMNS present
    glob: str = "*.py"  # files taken from a source folder, searched recursively
    shard_bytes: int = 64 << 20  # a JSONL shard is closed once it holds this many bytes


@dataclass
class Document:
    text: str
    source: str
    undecodable_bytes: int = 0


@dataclass
class SourceRecord:
    """What `corpus.json` says about one source."""

    path: str
    kind: str  # "folder", "parquet" or "jsonl"
    sha256: str = ""
    bytes: int = 0
    files: int = 0
    docs_read: int = 0
    text_column: str | None = None
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIPPED, 0))


# --- decoding -------------------------------------------------------------------------------


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


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_val(doc_sha256: str, seed: int, val_fraction: float) -> bool:
    """The split rule (SPLIT_RULE): a uniform draw fixed by the seed and the document's hash."""
    digest = hashlib.sha256(f"{seed}:{doc_sha256}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


# --- sources --------------------------------------------------------------------------------


def default_source() -> Path:
    """The running Python's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _pick_column(path: Path, columns: list[str], wanted: str | None, where: str = "") -> str:
    if wanted is not None:
        if wanted not in columns:
            raise InputError(
                f"{path}{where}: no column {wanted!r}; columns are: {', '.join(columns) or '(none)'}"
            )
        return wanted
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise InputError(
        f"{path}{where}: none of the text columns {', '.join(TEXT_COLUMNS)} found; columns are: "
        f"{', '.join(columns) or '(none)'}; pick one with --text-column"
    )


def list_folder(folder: Path, glob: str, excluded_dirs: frozenset[str] = frozenset()) -> list[str]:
    """Relative POSIX paths of the files under `folder` matching `glob` (matched from the right,
    like Path.match, so "*.py" finds them at any depth), sorted as strings."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if name not in excluded_dirs]
        relative_root = Path(root).relative_to(folder)
        found += [(relative_root / name).as_posix() for name in files
                  if PurePosixPath((relative_root / name).as_posix()).match(glob)]
    return sorted(found)


def _folder_documents(
    folder: Path, glob: str, record: SourceRecord, excluded_dirs: frozenset[str]
) -> Iterator[Document]:
    files = list_folder(folder, glob, excluded_dirs)
    root = folder.resolve()
    # The folder's sha256 is that of its `sha256sum`-style listing: "<file sha256>  <relpath>\n"
    # for every file taken, sorted by path.
    listing = hashlib.sha256()
    for relative in tqdm(files, desc=f"read {folder.name}", unit="file", disable=None):
        path = folder / relative
        skip = _skip_reason(path, root)
        if skip is None:
            data = _read_bounded(path)
            text, bad = decode_utf8(data)
            skip = oversize(text)
        if skip:
            record.skipped[skip] += 1
            continue
        listing.update(f"{hashlib.sha256(data).hexdigest()}  {relative}\n".encode())
        record.files += 1
        record.bytes += len(data)
        yield Document(text, f"{folder.name}/{relative}", bad)
    record.sha256 = listing.hexdigest()


def _skip_reason(path: Path, root: Path) -> str | None:
    """SYMLINKS for a link that dangles, loops or leads out of the source folder (it could pull
    any file of the machine into a published model), SPECIAL_FILES for anything but a regular
    file (a FIFO blocks the read, a device never ends); None for a file to read."""
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling, or a loop (RuntimeError before Python 3.13)
            return SYMLINKS
        if not target.is_relative_to(root):
            return SYMLINKS
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None
    return None if stat.S_ISREG(mode) else SPECIAL_FILES


def _read_bounded(path: Path) -> bytes:
    """At most MAX_DOCUMENT_BYTES + 1 bytes: one more than a document may hold tells it is too large."""
    try:
        # O_NONBLOCK: a file swapped for a FIFO after the check reads as empty instead of blocking.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            return handle.read(MAX_DOCUMENT_BYTES + 1) or b""
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None


def oversize(text: str) -> str | None:
    """TOO_LARGE or LONG_LINES when `text` is past a document bound, else None. Measured on the
    text as decoded (U+FFFD takes 3 bytes), so what `build_corpus` keeps `iter_texts` accepts."""
    # surrogatepass: a lone surrogate (from a JSON escape) is replaced later, by as many bytes
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        return TOO_LARGE
    if max(map(len, text.split("\n"))) > MAX_LINE_CHARS:
        return LONG_LINES
    return None


def _parquet_documents(path: Path, text_column: str | None, record: SourceRecord) -> Iterator[Document]:
    try:
        parquet = pq.ParquetFile(path)
        column = _pick_column(path, parquet.schema_arrow.names, text_column)
        record.text_column = column
        row = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            values = batch.column(0)
            binary = pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)
            for value in values.to_pylist():
                if value is None:
                    text, bad = "", 0
                elif binary:
                    text, bad = decode_utf8(value)
                elif isinstance(value, str):
                    text, bad = value, 0
                else:
                    raise InputError(f"{path}#{row}: column {column!r} holds {values.type}, not text "
                                     "(string or binary)")
                skip = oversize(text)
                if skip:
                    record.skipped[skip] += 1
                else:
                    yield Document(text, f"{path.name}#{row}", bad)
                row += 1
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"{path}: not a readable parquet file: {error}") from error
    record.sha256 = sha256_file(path)
    record.bytes = path.stat().st_size
    record.files = 1


def _jsonl_documents(path: Path, text_column: str | None, record: SourceRecord) -> Iterator[Document]:
    column = text_column
    with open(path, "rb") as handle:
        for line_number, raw in _bounded_lines(handle, MAX_JSONL_LINE_BYTES):
            where = f":{line_number}"
            if raw is None:
                record.skipped[TOO_LARGE] += 1
                continue
            line, bad = decode_utf8(raw)
            if not line.strip():
                continue
            item = _parse_json(line, f"{path}{where}", InputError)
            if not isinstance(item, dict):
                raise InputError(f"{path}{where}: expected a JSON object, got {type(item).__name__}")
            if column is None:
                column = _pick_column(path, list(item), None, where)
                record.text_column = column
            elif column not in item:
                _pick_column(path, list(item), column, where)
            value = item[column]
            if value is not None and not isinstance(value, str):
                raise InputError(f"{path}{where}: {column!r} is a {type(value).__name__}, not a string")
            skip = oversize(value or "")
            if skip:
                record.skipped[skip] += 1
                continue
            yield Document(value or "", f"{path.name}:{line_number}", bad)
    record.text_column = column
    record.sha256 = sha256_file(path)
    record.bytes = path.stat().st_size
    record.files = 1


def _bounded_lines(handle: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a file read line by line; None for a line over `limit` bytes,
    which is skipped without ever being held whole."""
    line_number = 0
    while raw := handle.readline(limit + 1):
        line_number += 1
        if len(raw) <= limit:
            yield line_number, raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = handle.readline(limit)
        yield line_number, None


def _parse_json(line: str | bytes, where: str, error_type: type[ShipkitError]) -> object:
    """One JSON value; `error_type` naming `where` when it is not valid JSON or nests too deep."""
    try:
        return json.loads(line)
    except RecursionError:
        raise error_type(f"{where}: JSON nested deeper than the parser's {sys.getrecursionlimit()} "
                         "levels") from None
    except ValueError as error:
        raise error_type(f"{where}: invalid JSON: {error}") from None


def read_source(path: Path, config: CorpusConfig, record: SourceRecord) -> Iterator[Document]:
    """Documents of one source, in a fixed order; fills `record` as it goes."""
    if record.kind == "folder":
        excluded = STDLIB_EXCLUDED_DIRS if path == default_source() else frozenset()
        yield from _folder_documents(path, config.glob, record, excluded)
    elif record.kind == "parquet":
        yield from _parquet_documents(path, config.text_column, record)
    else:
        yield from _jsonl_documents(path, config.text_column, record)


def source_kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file or folder (a FIFO, socket or device is no source)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise InputError(f"{path}: unsupported source; give a folder, a .parquet or a .jsonl file")


# --- output ---------------------------------------------------------------------------------


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
        raise InputError(f"--val-fraction must be between 0 and 1 (exclusive), got {config.val_fraction}")
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
            for document in read_source(path, config, record):
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
            f"{skipped_summary(_skipped_total(records))}; check the paths and --glob {config.glob!r}"
        )
    for split, writer in writers.items():
        if writer.docs == 0:
            raise InputError(
                f"the {split} split is empty: {kept} document(s) at --val-fraction {config.val_fraction}; "
                "add data or change --val-fraction"
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


# --- reading a corpus folder ----------------------------------------------------------------


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
        for line_number, line in _bounded_lines(handle, MAX_JSONL_LINE_BYTES):
            where = f"{path}:{line_number}"
            if line is None:
                raise IntegrityError(f"{where}: a line over {MAX_JSONL_LINE_BYTES:,} bytes; {REBUILD_CORPUS}")
            document = _parse_json(line, where, IntegrityError)
            text = document.get("text") if isinstance(document, dict) else None
            if not isinstance(text, str):
                raise IntegrityError(f"{where}: not a corpus document (an object with a \"text\" string)")
            bound = oversize(text)
            if bound:
                raise IntegrityError(f"{where}: a document with {BOUNDS[bound]}, past what `shipkit corpus build` "
                                     f"keeps; {REBUILD_CORPUS}")
            yield text
