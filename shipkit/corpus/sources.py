"""Reading the sources of a corpus: source folders, parquet and JSONL files, each yielding its
documents in a fixed order and filling its `SourceRecord` (what corpus.json says about it).

Hostile files are skipped and counted per source, never opened or handed on: FIFOs, sockets
and devices, symlinks that dangle, loop or lead out of their source folder, documents over
MAX_DOCUMENT_BYTES and documents with a line over MAX_LINE_CHARS.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from shipkit.corpus.format import (
    MAX_DOCUMENT_BYTES,
    MAX_JSONL_LINE_BYTES,
    SKIPPED,
    SPECIAL_FILES,
    SYMLINKS,
    TOO_LARGE,
)
from shipkit.corpus.jsonl import bounded_lines, parse_json
from shipkit.corpus.text import decode_utf8, oversize
from shipkit.errors import InputError
from shipkit.fsutil import sha256_file

# Tried in this order when no --text-column is given: the names used by common code datasets
# (The Stack, CodeSearchNet, generic text sets).
TEXT_COLUMNS = ("content", "code", "whole_func_string", "func_code_string", "text")
# The stdlib folder also holds third-party installs; those are not the stdlib's own source.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
PARQUET_BATCH_ROWS = 1024


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


def default_source() -> Path:
    """The running Python's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


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


def read_source(path: Path, record: SourceRecord, *, glob: str, text_column: str | None) -> Iterator[Document]:
    """Documents of one source, in a fixed order; fills `record` as it goes. `glob` picks a
    folder's files, `text_column` a parquet or JSONL file's column (None: the first of
    TEXT_COLUMNS present)."""
    if record.kind == "folder":
        excluded = STDLIB_EXCLUDED_DIRS if path == default_source() else frozenset()
        yield from _folder_documents(path, glob, record, excluded)
    elif record.kind == "parquet":
        yield from _parquet_documents(path, text_column, record)
    else:
        yield from _jsonl_documents(path, text_column, record)


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
        f"{', '.join(columns) or '(none)'}; pick one with text_column"
    )


# --- source folders -------------------------------------------------------------------------


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


# --- parquet and JSONL files ----------------------------------------------------------------


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
        for line_number, raw in bounded_lines(handle, MAX_JSONL_LINE_BYTES):
            where = f":{line_number}"
            if raw is None:
                record.skipped[TOO_LARGE] += 1
                continue
            line, bad = decode_utf8(raw)
            if not line.strip():
                continue
            item = parse_json(line, f"{path}{where}", InputError)
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
