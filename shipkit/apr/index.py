"""The structure of an APR file: the fixed header, the JSON index and the footer, parsed and
checked against the header's limits and the file's size into an `AprIndex` (tensor data is not
read here; `reader` checks it). Layout constants: `shipkit.apr.format`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipkit.apr import format as fmt
from shipkit.config import shown


@dataclass(frozen=True)
class TensorInfo:
    """One index entry; `offset` is absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: int


@dataclass(frozen=True)
class AprIndex:
    """Everything in an APR file except the tensor data."""

    path: Path
    version: int
    file_size: int
    data_offset: int
    root_digest: int  # the header digest: covers the index, hence every tensor checksum
    metadata: dict[str, Any]
    tensors: list[TensorInfo]

    def to_dict(self) -> dict[str, Any]:
        """What `shipkit inspect --json` prints: the digest in hex, no data offsets or checksums."""
        return {
            "path": str(self.path),
            "version": self.version,
            "file_size": self.file_size,
            "root_digest": f"{self.root_digest:016x}",
            "metadata": self.metadata,
            "tensors": [{"name": info.name, "dtype": info.dtype, "shape": list(info.shape), "nbytes": info.nbytes}
                        for info in self.tensors],
        }


def size_problem(expected: int, found: int, *, at_least: bool = False) -> str:
    """A file of `found` bytes where `expected` (or `at_least` that many) were due."""
    if found < expected:
        qualifier = "at least " if at_least else ""
        return f"truncated: expected {qualifier}{expected} bytes, found {found}"
    return f"appended bytes: expected {expected} bytes, found {found} ({found - expected} extra)"


def parse_index(buffer: Any, size: int, path: Path) -> tuple[AprIndex | None, list[str]]:
    """Header, layout, header digest, index and footer. Returns no index if it cannot be trusted
    enough to locate the tensors."""
    if size < fmt.MIN_FILE_SIZE:
        return None, [size_problem(fmt.MIN_FILE_SIZE, size, at_least=True)]
    header = bytes(buffer[: fmt.HEADER_SIZE])
    (magic, version, flags, tensor_count, index_length, data_offset, data_length, file_size,
     stored_digest) = fmt.HEADER_STRUCT.unpack(header)
    if magic != fmt.MAGIC:
        return None, [f"header: not an APR file (magic {magic!r})"]
    if version != fmt.VERSION:
        return None, [f"header: APR version {version} is not supported "
                      f"(this reader reads {fmt.VERSION})"]
    problems = []
    if file_size != size:
        problems.append(size_problem(file_size, size))
    layout = _layout_problem(flags, tensor_count, index_length, data_offset, data_length, file_size)
    if layout:
        return None, problems + [f"header: {layout}"]
    if data_offset > size:
        return None, problems
    if fmt.header_digest(header, buffer[fmt.HEADER_SIZE : data_offset]) != stored_digest:
        problems.append("header: checksum MISMATCH (fixed header, index or metadata corrupt)")
    if size >= file_size:
        problems += _footer_problems(buffer, file_size)
    index_end = fmt.HEADER_SIZE + index_length
    if any(buffer[index_end:data_offset]):
        problems.append(f"header: padding bytes {index_end}..{data_offset} are not zero")
    entries, metadata, index_problems = _decode_index(buffer[fmt.HEADER_SIZE : index_end])
    if index_problems:
        return None, problems + index_problems
    tensors, entry_problems = _tensor_infos(entries, tensor_count, data_offset, data_length)
    if entry_problems:
        return None, problems + entry_problems
    index = AprIndex(path=path, version=version, file_size=file_size, data_offset=data_offset,
                     root_digest=stored_digest, metadata=metadata, tensors=tensors)
    return index, problems


def _layout_problem(flags: int, tensor_count: int, index_length: int, data_offset: int,
                    data_length: int, file_size: int) -> str | None:
    if flags:
        return f"flags {flags:#x} set; APR v2 defines none"
    if tensor_count > fmt.MAX_TENSORS:
        return f"tensor count {tensor_count} exceeds the limit of {fmt.MAX_TENSORS}"
    if index_length > fmt.MAX_INDEX_BYTES:
        return f"index length {index_length} exceeds the limit of {fmt.MAX_INDEX_BYTES} bytes"
    if data_offset != fmt.align(fmt.HEADER_SIZE + index_length):
        return f"data offset {data_offset} is not the 64-byte boundary after the index"
    if data_offset + data_length + fmt.FOOTER_SIZE != file_size:
        return (f"data offset {data_offset} + data length {data_length} + footer "
                f"{fmt.FOOTER_SIZE} != file size {file_size}")
    return None


def _footer_problems(buffer: Any, file_size: int) -> list[str]:
    footer = bytes(buffer[file_size - fmt.FOOTER_SIZE : file_size])
    magic, footer_size = fmt.FOOTER_STRUCT.unpack(footer)
    if magic != fmt.FOOTER_MAGIC or footer_size != file_size:
        return [f"footer: corrupt (magic {magic!r}, size {footer_size}; "
                f"expected file size {file_size})"]
    return []


def _decode_index(raw: Any) -> tuple[list[Any], dict[str, Any], list[str]]:
    try:
        index = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        return [], {}, [f"index: not valid UTF-8 JSON ({type(error).__name__})"]
    if not isinstance(index, dict) or set(index) != {"metadata", "tensors"}:
        return [], {}, ["index: must be an object with exactly the keys metadata and tensors"]
    if not isinstance(index["metadata"], dict) or not isinstance(index["tensors"], list):
        return [], {}, ["index: metadata must be an object and tensors a list"]
    return index["tensors"], index["metadata"], []


_ENTRY_KEYS = {"name", "dtype", "shape", "offset", "nbytes", "xxh3"}


def _tensor_infos(entries: list[Any], tensor_count: int, data_offset: int,
                  data_length: int) -> tuple[list[TensorInfo], list[str]]:
    """Index entries -> TensorInfo, checking that they tile the data region exactly: in index
    order, each at the next 64-byte boundary, with nbytes = numel x itemsize."""
    if len(entries) != tensor_count:
        return [], [f"tensor count: header says {tensor_count}, index lists {len(entries)}"]
    infos: list[TensorInfo] = []
    problems: list[str] = []
    names: set[str] = set()
    end = 0  # relative to data_offset
    for position, entry in enumerate(entries):
        where = f"index entry {position}"
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            keys = ", ".join(sorted(_ENTRY_KEYS))
            problems.append(f"{where}: must be an object with keys {keys}")
            continue
        name = entry["name"]
        why = fmt.name_problem(name)
        if why:
            problems.append(f"{where}: tensor name {name!r} {why}")
            continue
        where = f"tensor {name}"
        if name in names:
            problems.append(f"{where}: listed twice")
        names.add(name)
        entry_problem = _entry_problem(entry)
        if entry_problem:
            problems.append(f"{where}: {entry_problem}")
            continue
        offset, nbytes = entry["offset"], entry["nbytes"]
        if offset % fmt.ALIGNMENT:
            problems.append(f"{where}: offset {offset} is not 64-byte aligned")
        elif offset < end:
            problems.append(
                f"{where}: offset {offset} overlaps the previous tensor (ends at {end})"
            )
        elif offset != fmt.align(end):
            problems.append(f"{where}: offset {offset} leaves a gap (expected {fmt.align(end)})")
        if offset + nbytes > data_length:
            problems.append(f"{where}: bytes {offset}..{offset + nbytes} lie beyond the data "
                            f"region ({data_length} bytes)")
        end = max(end, offset + nbytes)
        infos.append(TensorInfo(name=name, dtype=entry["dtype"], shape=tuple(entry["shape"]),
                                offset=data_offset + offset, nbytes=nbytes,
                                checksum=int(entry["xxh3"], 16)))
    if not problems and end != data_length:
        problems.append(f"index: tensors end at {end} but the data region is {data_length} bytes")
    return infos, problems


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(entry: dict[str, Any]) -> str | None:
    dtype, shape = entry["dtype"], entry["shape"]
    if not isinstance(dtype, str) or dtype not in fmt.DTYPES:
        return f"dtype {shown(dtype)} is not one of {', '.join(fmt.DTYPES)}"
    if not isinstance(shape, list) or len(shape) > fmt.MAX_NDIM or not all(map(_is_count, shape)):
        return f"shape {shown(shape)} must be a list of at most {fmt.MAX_NDIM} non-negative integers"
    if not _is_count(entry["offset"]) or not _is_count(entry["nbytes"]):
        return "offset and nbytes must be non-negative integers"
    numel = 1
    for dim in shape:
        numel *= dim
    expected = numel * fmt.DTYPE_SIZES[dtype]
    if entry["nbytes"] != expected:
        return f"nbytes {entry['nbytes']} != {dtype} x {shape} = {expected} bytes"
    digest = entry["xxh3"]
    if not isinstance(digest, str) or len(digest) != 16 or digest.strip("0123456789abcdef"):
        return f"xxh3 {shown(digest)} is not 16 lowercase hex digits"
    return None
