"""Reading and validating APR v2 files (layout in `shipkit.apr.format`, spec in docs/apr-format.md).

Every check reads the file through one memory map. Structure is checked against the header's
limits before anything is parsed, so a crafted file cannot make us allocate more than the
file itself; the per-tensor checksums are computed on the very bytes that become tensors.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from shipkit.apr import format as fmt
from shipkit.errors import InputError, IntegrityError, ShipkitError
from shipkit.model import ModelConfig, shown, weight_shapes


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


@dataclass
class ValidationReport:
    """Result of `validate_apr`: `ok` is True exactly when `problems` is empty."""

    path: Path
    problems: list[str] = field(default_factory=list)
    version: int | None = None
    tensor_count: int | None = None
    nbytes: int = 0  # size of the file on disk

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "ok": self.ok}


@dataclass
class AprCheckpoint:
    """A read APR file: `tensors` are zero-copy views of a private (copy-on-write) memory map."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def config(self) -> ModelConfig | None:
        config = self.metadata.get("config")
        return None if config is None else ModelConfig.from_dict(config)


def validate_apr(
    path: str | os.PathLike[str], *, expect_tensors: int | None = None
) -> ValidationReport:
    """Check every byte of `path`; defects are listed in the report, never raised.

    Raises InputError only if `path` is missing or unreadable.
    """
    path = Path(path)
    report = ValidationReport(path=path)
    with _mapped(path) as (buffer, size):
        report.nbytes = size
        index, report.problems = _parse(buffer, size, path)
        if index is None:
            return report
        report.version = index.version
        report.tensor_count = len(index.tensors)
        report.problems += _check_data(buffer, size, index)
        report.problems += _check_metadata(index, expect_tensors)
    return report


def inspect_apr(path: str | os.PathLike[str]) -> AprIndex:
    """Header, metadata and tensor table without reading the tensor data.

    Raises IntegrityError if the structure or the metadata is broken (use `validate_apr` to
    list every defect), so what it returns can be trusted as far as it goes.
    """
    path = Path(path)
    with _mapped(path) as (buffer, size):
        index, problems = _parse(buffer, size, path)
    if index is not None:
        problems += _check_metadata(index, None)
    _raise_on(path, problems)
    assert index is not None  # _parse returns an index whenever it reports no problem
    return index


def read_apr(path: str | os.PathLike[str], *, verify: bool = True) -> AprCheckpoint:
    """Memory-map `path` and return its tensors without copying them.

    With `verify` every tensor checksum and padding byte is checked first (at hash speed);
    without it only the structure, header digest and metadata are. Raises IntegrityError
    naming the first defect, InputError if the file is missing.
    """
    path = Path(path)
    with _open(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < fmt.MIN_FILE_SIZE:
            _raise_on(path, [_size_problem(fmt.MIN_FILE_SIZE, size, at_least=True)])
        # A private map: tensors may be written to without touching the file or copying it first.
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    index, problems = _parse(buffer, size, path)
    if index is not None:
        if verify:
            problems += _check_data(buffer, size, index)
        problems += _check_metadata(index, None)
    if problems:
        buffer.close()
        _raise_on(path, problems)
    assert index is not None  # _parse returns an index whenever it reports no problem
    tensors = {info.name: _tensor_view(buffer, info) for info in index.tensors}
    return AprCheckpoint(path=path, version=index.version, metadata=index.metadata, tensors=tensors)


def _tensor_view(buffer: mmap.mmap, info: TensorInfo) -> torch.Tensor:
    dtype = fmt.DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    count = info.nbytes // fmt.DTYPE_SIZES[info.dtype]
    flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=info.offset)
    return flat.view(info.shape)


def _raise_on(path: Path, problems: list[str]) -> None:
    if not problems:
        return
    more = ""
    if len(problems) > 1:
        more = f" (and {len(problems) - 1} more: run `shipkit validate {path}`)"
    raise IntegrityError(f"{path.name}: {problems[0]}{more}")


def _open(path: Path) -> BinaryIO:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return open(path, "rb")
    except OSError as error:
        raise InputError(f"{path}: cannot open ({error.strerror})") from error


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[tuple[Any, int]]:
    """A read-only map of the file and its size (the bytes themselves for a file too small to
    be APR, which cannot be mapped if empty)."""
    with _open(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < fmt.MIN_FILE_SIZE:
            yield handle.read(), size
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            yield buffer, size


def _size_problem(expected: int, found: int, *, at_least: bool = False) -> str:
    if found < expected:
        qualifier = "at least " if at_least else ""
        return f"truncated: expected {qualifier}{expected} bytes, found {found}"
    return f"appended bytes: expected {expected} bytes, found {found} ({found - expected} extra)"


def _parse(buffer: Any, size: int, path: Path) -> tuple[AprIndex | None, list[str]]:
    """Header, layout, header digest, index and footer. Returns no index if it cannot be trusted
    enough to locate the tensors."""
    if size < fmt.MIN_FILE_SIZE:
        return None, [_size_problem(fmt.MIN_FILE_SIZE, size, at_least=True)]
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
        problems.append(_size_problem(file_size, size))
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


def _check_data(buffer: Any, size: int, index: AprIndex) -> list[str]:
    """Per-tensor checksums and zero padding: together they cover the data region once."""
    problems = []
    view = memoryview(buffer)
    end = index.data_offset
    try:
        for position, info in enumerate(index.tensors):
            if any(view[end : info.offset]):
                problems.append(f"tensor {info.name}: padding before it is not zero")
            end = info.offset + info.nbytes
            if end > size:
                later = len(index.tensors) - position - 1
                also = f", and so are the {later} tensors after it" if later else ""
                problems.append(f"tensor {info.name}: missing (file truncated){also}")
                break
            if fmt.checksum(view[info.offset : end]) != info.checksum:
                problems.append(f"tensor {info.name}: checksum MISMATCH")
    finally:
        view.release()
    return problems


def _check_metadata(index: AprIndex, expect_tensors: int | None) -> list[str]:
    """What the metadata claims, checked against itself and the tensor table, so that no later
    stage divides by, allocates for, or opens a path from a lie that the checksums cover."""
    problems = []
    metadata = index.metadata
    kind = metadata.get("kind")
    if kind not in fmt.KINDS:
        problems.append(f"metadata kind: {shown(kind)} is not one of {', '.join(fmt.KINDS)}")
    config, config_problem = _config_of(metadata)
    if config_problem:
        problems.append(config_problem)
    if kind == "weights" and config is not None:
        problems += _weights_problems(index.tensors, config)
    problems += [problem for problem in (_tokenizer_problem(metadata), _producer_problem(metadata))
                 if problem]
    count = len(index.tensors)
    if expect_tensors is not None and count != expect_tensors:
        problems.append(f"tensor count: expected {expect_tensors} tensors, file has {count}")
    return problems


def _config_of(metadata: dict[str, Any]) -> tuple[ModelConfig | None, str | None]:
    """(the metadata's model config or None if it has none, the reason it does not construct)."""
    config = metadata.get("config")
    if config is None:
        return None, None
    try:
        return ModelConfig.from_dict(config), None
    except ShipkitError as error:
        return None, f"metadata config: invalid ({error})"


def _weights_problems(tensors: list[TensorInfo], config: ModelConfig) -> list[str]:
    """The tensors are exactly the config's model's weights: names, shapes (from a model on the
    meta device) and a floating dtype."""
    expected = weight_shapes(config)
    if len(tensors) != len(expected):
        return [f"tensor count: the config implies {len(expected)} tensors, file has {len(tensors)}"]
    problems = []
    for info in tensors:
        if info.name not in expected:
            problems.append(f"tensor {info.name}: not a weight of the config's {config.architecture} model")
        elif info.shape != expected[info.name]:
            problems.append(f"tensor {info.name}: shape {list(info.shape)}, the config implies "
                            f"{list(expected[info.name])}")
        elif info.dtype not in fmt.WEIGHT_DTYPES:
            problems.append(f"tensor {info.name}: dtype {info.dtype} is not a weight dtype "
                            f"({', '.join(fmt.WEIGHT_DTYPES)})")
    return problems


NOT_RECORDED = (None, "")  # a tokenizer sha256 left out (readers then skip the comparison)


def _tokenizer_problem(metadata: dict[str, Any]) -> str | None:
    recorded = metadata.get("tokenizer")
    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        return f"metadata tokenizer: expected an object, got {shown(recorded)}"
    name = recorded.get("file", fmt.DEFAULT_TOKENIZER_FILE)
    why = fmt.file_name_problem(name)
    if why:
        return (f"metadata tokenizer.file: {shown(name)} {why} (a plain file name, looked up "
                "beside the checkpoint and in its parent)")
    digest = recorded.get("sha256")
    if digest not in NOT_RECORDED and not (isinstance(digest, str) and len(digest) == fmt.SHA256_HEX_CHARS
                                           and not digest.strip("0123456789abcdef")):
        return f"metadata tokenizer.sha256: {shown(digest)} is not {fmt.SHA256_HEX_CHARS} lowercase hex digits"
    pre = recorded.get("pre")  # llama.cpp's pre-tokenizer name, recorded by import
    if pre is not None and not isinstance(pre, str):
        return f"metadata tokenizer.pre: expected a name, got {shown(pre)}"
    return None


def _producer_problem(metadata: dict[str, Any]) -> str | None:
    producer = metadata.get("producer")
    if producer is None:
        return None
    if not isinstance(producer, dict):
        return f"metadata producer: expected an object, got {shown(producer)}"
    # An import records its upstream as an object, `shipkit convert` the source file's name.
    if not isinstance(producer.get("source", {}), (dict, str)):
        return f"metadata producer.source: expected an object or a name, got {shown(producer['source'])}"
    return None


def checked_tokenizer_name(metadata: dict[str, Any]) -> str:
    """The tokenizer file name a checkpoint's metadata records (`tokenizer.json` if none): a
    plain file name, to be looked up beside the checkpoint and in its parent only. Raises
    IntegrityError for a path (`/`, `..`) or a malformed `tokenizer` entry."""
    problem = _tokenizer_problem(metadata)
    if problem:
        raise IntegrityError(problem)
    return (metadata.get("tokenizer") or {}).get("file", fmt.DEFAULT_TOKENIZER_FILE)
