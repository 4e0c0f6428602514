"""Writing APR v2 files (layout in `shipkit.apr.format`, spec in docs/apr-format.md).

APR is our own container, so no library writes it. The writer streams: every tensor's name,
dtype and shape are known before its bytes are, so the index is written first with each
`xxh3` a 16-hex-digit placeholder (fixed width: the index keeps its length), the tensor bytes
are streamed and hashed as they go, and at the end the index and the header digest are
rewritten in place before the file is renamed over its target. Only one chunk of one tensor is
ever held, so a 7B checkpoint is written in the memory of a few MiB.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import xxhash

from shipkit.apr import format as fmt
from shipkit.config import ModelConfig
from shipkit.errors import InputError
from shipkit.fsutil import atomic_write, check_file_target

# Bytes of one streamed chunk: large enough that per-chunk overhead vanishes against the copy,
# small enough that the two a conversion holds at once are noise next to a stage's start-up
# memory (~230 MiB with torch) and to the largest tensor of a 7B model (1.1 GB of bf16 embedding).
STREAM_CHUNK_BYTES = 16 << 20
PLACEHOLDER_DIGEST = "0" * 16  # the width of every xxh3 in the index, so rewriting keeps the length


@dataclass(frozen=True)
class TensorSpec:
    """What the index says of a tensor before its bytes exist: name, APR dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * fmt.DTYPE_SIZES[self.dtype]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        """The spec of `tensor` as it is (its own dtype and shape)."""
        _check_tensor(name, tensor)
        if tensor.dtype not in fmt.DTYPE_NAMES:
            raise InputError(f"tensor {name}: dtype {tensor.dtype} is not supported by APR "
                             f"(supported: {', '.join(fmt.DTYPES)})")
        return cls(name, fmt.DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))


@dataclass(frozen=True)
class _Layout:
    """Where everything goes, known before a byte is written: the index entries (digests still
    placeholders), the index's length and the data region."""

    entries: list[dict[str, Any]]
    index_length: int
    data_offset: int
    data_length: int

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_length + fmt.FOOTER_SIZE


def _layout(specs: Sequence[TensorSpec], metadata: Mapping[str, Any]) -> _Layout:
    entries, end = [], 0
    for spec in specs:
        offset = fmt.align(end)
        entries.append({"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape),
                        "offset": offset, "nbytes": spec.nbytes, "xxh3": PLACEHOLDER_DIGEST})
        end = offset + spec.nbytes
    index_length = len(_encode_index(metadata, entries))
    return _Layout(entries, index_length, fmt.align(fmt.HEADER_SIZE + index_length), end)


class AprWriter:
    """Streams the tensors of a fixed plan into an open file, in plan order (see `apr_writer`)."""

    def __init__(self, handle: IO[bytes], layout: _Layout, metadata: Mapping[str, Any]) -> None:
        self._handle = handle
        self._layout = layout
        self._metadata = metadata
        self._written = 0  # tensors written so far
        self._position = 0  # bytes of the data region written so far
        handle.write(bytes(layout.data_offset))  # header and index, rewritten by `finish`

    def write(self, name: str, chunks: Iterable[Any]) -> None:
        """The plan's next tensor, `name`, as bytes-like chunks in order (hashed as written)."""
        entry = self._next_entry(name)
        self._handle.write(bytes(entry["offset"] - self._position))
        hasher = xxhash.xxh3_64()
        written = 0
        for chunk in chunks:
            hasher.update(chunk)
            self._handle.write(chunk)
            written += memoryview(chunk).nbytes
        if written != entry["nbytes"]:
            raise InputError(f"tensor {name}: {written} bytes written, its {entry['dtype']} "
                             f"{entry['shape']} holds {entry['nbytes']}")
        entry["xxh3"] = fmt.digest_hex(hasher.intdigest())
        self._position = entry["offset"] + written
        self._written += 1

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """The plan's next tensor from a torch tensor of its shape, converted chunk by chunk
        to the plan's dtype where it differs."""
        entry = self._next_entry(name)
        if list(tensor.shape) != entry["shape"]:
            raise InputError(f"tensor {name}: shape {list(tensor.shape)}, the plan says {entry['shape']}")
        self.write(name, tensor_chunks(tensor, fmt.DTYPES[entry["dtype"]]))

    def _next_entry(self, name: str) -> dict[str, Any]:
        entries = self._layout.entries
        if self._written == len(entries):
            raise InputError(f"tensor {name}: not in the plan (its {len(entries)} tensors are written)")
        entry = entries[self._written]
        if name != entry["name"]:
            raise InputError(f"tensor {name}: written out of order (the plan's next tensor is {entry['name']})")
        return entry

    def finish(self) -> None:
        """The footer, then the index with the real digests and the header, rewritten in place."""
        layout = self._layout
        if self._written != len(layout.entries):
            missing = layout.entries[self._written]["name"]
            raise InputError(f"tensor {missing}: not written ({self._written} of {len(layout.entries)} tensors)")
        self._handle.write(fmt.FOOTER_STRUCT.pack(fmt.FOOTER_MAGIC, layout.file_size))
        index = _encode_index(self._metadata, layout.entries)
        assert len(index) == layout.index_length  # fixed-width digests replaced the placeholders
        index_region = index + bytes(layout.data_offset - fmt.HEADER_SIZE - len(index))
        header = fmt.HEADER_STRUCT.pack(fmt.MAGIC, fmt.VERSION, 0, len(layout.entries), len(index),
                                        layout.data_offset, layout.data_length, layout.file_size, 0)
        digest = fmt.header_digest(header, index_region).to_bytes(8, "little")
        self._handle.seek(0)
        self._handle.write(header[: fmt.HEADER_DIGEST_OFFSET] + digest)
        self._handle.write(index_region)


@contextlib.contextmanager
def apr_writer(path: str | os.PathLike[str], specs: Sequence[TensorSpec],
               metadata: Mapping[str, Any]) -> Iterator[AprWriter]:
    """An `AprWriter` for `specs` (the tensors, in file order) writing a temp file beside
    `path` that is renamed over `path` once every tensor is in (`fsutil.atomic_write`): an
    exception, a kill or a full disk leaves any previous `path` whole and no partial file under
    its name.

    Raises InputError, before the file is opened, for a bad tensor name, dtype or shape,
    metadata that is not JSON or lacks a valid `kind`, (kind "weights" with a `config`) a tensor
    count the config does not imply, or a `path` that is a folder; InputError for tensors
    written out of plan or left out; IntegrityError for a full disk.
    """
    check_file_target(Path(path))
    _check_specs(specs)
    _check_metadata(metadata, len(specs))
    layout = _layout(specs, metadata)
    with atomic_write(path, "wb", size=layout.file_size) as handle:
        writer = AprWriter(handle, layout, metadata)
        yield writer
        writer.finish()


def write_apr(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
              metadata: Mapping[str, Any]) -> None:
    """Atomically write `tensors` (in mapping order) and JSON `metadata` to `path`.

    Each tensor is hashed once and written once, through `apr_writer`. Raises InputError for a
    bad tensor name or dtype, metadata that is not JSON or lacks a valid `kind`, (kind
    "weights" with a `config`) a tensor count the config does not imply, or a `path` that is a
    folder; IntegrityError for a full disk.
    """
    specs = [TensorSpec.of(name, tensor) for name, tensor in tensors.items()]
    with apr_writer(path, specs, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write_tensor(name, tensor)


def tensor_chunks(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> Iterator[np.ndarray]:
    """The tensor's bytes (row-major, little-endian) in `dtype` (default: its own), as flat
    uint8 arrays of at most about STREAM_CHUNK_BYTES, each valid until the next is drawn. A
    tensor already in `dtype` is not copied when contiguous; a conversion goes through one
    reused buffer (fresh chunk-sized allocations leave freed heap that the allocator keeps)."""
    dtype = dtype or tensor.dtype
    flat = tensor.detach().reshape(-1)  # a view when contiguous (a mapped checkpoint always is)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    step = max(1, STREAM_CHUNK_BYTES // max(tensor.element_size(), dtype.itemsize))
    converted = None if flat.dtype == dtype else torch.empty(min(step, flat.numel()), dtype=dtype)
    for start in range(0, flat.numel(), step):
        piece = flat[start:start + step]
        if converted is not None:
            piece = converted[:len(piece)].copy_(piece)
        yield piece.contiguous().view(torch.uint8).numpy()


def _check_tensor(name: str, tensor: Any) -> None:
    why = fmt.name_problem(name)
    if why:
        raise InputError(f"tensor name {name!r}: {why}")
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"tensor {name}: not a torch.Tensor ({type(tensor).__name__})")


def _check_specs(specs: Sequence[TensorSpec]) -> None:
    names: set[str] = set()
    for spec in specs:
        why = fmt.name_problem(spec.name)
        if why:
            raise InputError(f"tensor name {spec.name!r}: {why}")
        if spec.name in names:
            raise InputError(f"tensor {spec.name}: listed twice")
        names.add(spec.name)
        if spec.dtype not in fmt.DTYPES:
            raise InputError(f"tensor {spec.name}: dtype {spec.dtype!r} is not supported by APR "
                             f"(supported: {', '.join(fmt.DTYPES)})")
        if len(spec.shape) > fmt.MAX_NDIM or any(dim < 0 for dim in spec.shape):
            raise InputError(f"tensor {spec.name}: shape {list(spec.shape)} must have at most "
                             f"{fmt.MAX_NDIM} non-negative dimensions")
    if len(specs) > fmt.MAX_TENSORS:
        raise InputError(f"{len(specs)} tensors exceed the APR limit of {fmt.MAX_TENSORS}")


def _check_metadata(metadata: Mapping[str, Any], tensor_count: int) -> None:
    kind = metadata.get("kind")
    if kind not in fmt.KINDS:
        raise InputError(f"metadata kind: {kind!r} must be one of {', '.join(fmt.KINDS)}")
    config = metadata.get("config")
    if kind == "weights" and config is not None:
        expected = ModelConfig.from_dict(config).expected_tensor_count()
        if tensor_count != expected:
            raise InputError(
                f"tensor count: the config implies {expected} tensors, got {tensor_count}"
            )


def _encode_index(metadata: Mapping[str, Any], entries: list[dict[str, Any]]) -> bytes:
    try:
        text = json.dumps({"metadata": dict(metadata), "tensors": entries},
                          ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise InputError(f"metadata: not JSON-serialisable ({error})") from error
    encoded = text.encode("utf-8")
    if len(encoded) > fmt.MAX_INDEX_BYTES:
        raise InputError(
            f"index: {len(encoded)} bytes exceeds the APR limit of {fmt.MAX_INDEX_BYTES}"
        )
    return encoded
