"""Reading and validating APR v2 files: `validate_apr` (every defect listed), `inspect_apr`
(header, metadata and tensor table) and `read_apr` (tensors memory-mapped), with the tensor data
checks (checksums, padding). Spec: docs/apr-format.md.

Every check reads the file through one memory map. Structure is checked against the header's
limits before anything is parsed (`index`), so a crafted file cannot make us allocate more than
the file itself; the per-tensor checksums are computed on the very bytes that become tensors.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from shipkit.apr import format as fmt
from shipkit.apr.index import AprIndex, TensorInfo, parse_index, size_problem
from shipkit.apr.metadata import metadata_problems
from shipkit.config import ModelConfig
from shipkit.errors import InputError, IntegrityError


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
        index, report.problems = parse_index(buffer, size, path)
        if index is None:
            return report
        report.version = index.version
        report.tensor_count = len(index.tensors)
        report.problems += _check_data(buffer, size, index)
        report.problems += metadata_problems(index, expect_tensors)
    return report


def inspect_apr(path: str | os.PathLike[str]) -> AprIndex:
    """Header, metadata and tensor table without reading the tensor data.

    Raises IntegrityError if the structure or the metadata is broken (use `validate_apr` to
    list every defect), so what it returns can be trusted as far as it goes.
    """
    path = Path(path)
    with _mapped(path) as (buffer, size):
        index, problems = parse_index(buffer, size, path)
    if index is not None:
        problems += metadata_problems(index, None)
    _raise_on(path, problems)
    assert index is not None  # parse_index returns an index whenever it reports no problem
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
            _raise_on(path, [size_problem(fmt.MIN_FILE_SIZE, size, at_least=True)])
        # A private map: tensors may be written to without touching the file or copying it first.
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    index, problems = parse_index(buffer, size, path)
    if index is not None:
        if verify:
            problems += _check_data(buffer, size, index)
        problems += metadata_problems(index, None)
    if problems:
        buffer.close()
        _raise_on(path, problems)
    assert index is not None  # parse_index returns an index whenever it reports no problem
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
