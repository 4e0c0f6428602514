"""safetensors <-> APR conversion, so existing weights can be checked and carried, and the
streaming safetensors reader and writer that import and export share.

safetensors holds only string metadata; the APR metadata travels through it as one JSON string
under `METADATA_KEY`, so APR -> safetensors -> APR keeps it. Both directions stream tensor by
tensor, chunk by chunk: a 7B checkpoint converts in the memory of a few chunks.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch

from shipkit import __version__
from shipkit.apr import format as fmt
from shipkit.apr.reader import read_apr
from shipkit.apr.writer import STREAM_CHUNK_BYTES, TensorSpec, apr_writer, tensor_chunks
from shipkit.config import ModelConfig
from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import atomic_write, check_file_target

METADATA_KEY = "shipkit.apr_metadata"
APR_SUFFIX = ".apr"
SAFETENSORS_SUFFIX = ".safetensors"
# The safetensors layout: a u64 little-endian header length, the JSON header padded with spaces
# so that the data starts 8-byte aligned (what safetensors itself writes), then the tensor bytes.
SAFETENSORS_LENGTH = struct.Struct("<Q")
SAFETENSORS_HEADER_ALIGNMENT = 8
SAFETENSORS_METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class ConversionReport:
    source: Path
    destination: Path
    tensor_count: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": str(self.source), "destination": str(self.destination), "tensors": self.tensor_count}


def convert_checkpoint(source: str | os.PathLike[str], destination: str | os.PathLike[str], *,
                       config_path: str | os.PathLike[str] | None = None,
                       dtype: torch.dtype | None = None) -> ConversionReport:
    """Convert `source` to `destination` by their extensions (.safetensors <-> .apr).
    `config_path` (a ModelConfig JSON) replaces the metadata's `config`; `dtype` converts every
    floating-point tensor (default: each keeps its own)."""
    source, destination = Path(source), Path(destination)
    direction = (source.suffix, destination.suffix)
    if direction not in {(SAFETENSORS_SUFFIX, APR_SUFFIX), (APR_SUFFIX, SAFETENSORS_SUFFIX)}:
        raise InputError(f"convert: {source.name} -> {destination.name}: give one .safetensors "
                         "and one .apr file")
    if not source.is_file():
        raise InputError(f"{source}: no such file")
    check_file_target(destination)
    config = None if config_path is None else load_config(config_path).to_dict()
    if source.suffix == APR_SUFFIX:
        checkpoint = read_apr(source)
        metadata = checkpoint.metadata if config is None else {**checkpoint.metadata, "config": config}
        write_safetensors(destination, checkpoint.tensors,
                          {"format": "pt", METADATA_KEY: json.dumps(metadata)}, dtype=dtype)
        return ConversionReport(source, destination, len(checkpoint.tensors))
    with open_safetensors(source) as handle:
        metadata = _apr_metadata(handle, source)
        if config is not None:
            metadata = {**metadata, "config": config}
        specs = [_stored_spec(spec, dtype) for spec in safetensors_specs(handle, source)]
        with apr_writer(destination, specs, metadata) as writer:
            for spec in specs:
                writer.write(spec.name, safetensors_chunks(handle, spec, source))
    return ConversionReport(source, destination, len(specs))


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str], *, dtype: torch.dtype | None = None) -> int:
    """Atomically write `tensors` (in mapping order) as a safetensors file with the string
    `metadata`; `dtype` converts every floating-point tensor. Returns the tensor bytes written.

    safetensors' own `save` needs every tensor's bytes in memory at once (a converted copy of
    each where the dtype changes), so this writer is by hand: the header, whose offsets follow
    from the shapes alone, then each tensor streamed chunk by chunk. Raises InputError for a
    dtype safetensors cannot name, IntegrityError for a full disk.
    """
    entries: dict[str, Any] = {SAFETENSORS_METADATA_KEY: dict(metadata)}
    stored: dict[str, torch.dtype] = {}
    end = 0
    for name, tensor in tensors.items():
        stored[name] = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if stored[name] not in fmt.DTYPE_NAMES:
            raise InputError(f"tensor {name}: dtype {stored[name]} has no safetensors name")
        nbytes = tensor.numel() * stored[name].itemsize
        entries[name] = {"dtype": fmt.DTYPE_NAMES[stored[name]], "shape": list(tensor.shape),
                         "data_offsets": [end, end + nbytes]}
        end += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % SAFETENSORS_HEADER_ALIGNMENT)
    with atomic_write(path, "wb", size=SAFETENSORS_LENGTH.size + len(header) + end) as handle:
        handle.write(SAFETENSORS_LENGTH.pack(len(header)))
        handle.write(header)
        for name, tensor in tensors.items():
            for chunk in tensor_chunks(tensor, stored[name]):
                handle.write(chunk)
    return end


def open_safetensors(path: Path) -> Any:
    """`safetensors.safe_open` (torch tensors, memory-mapped); its header is checked against the
    file on opening (a truncated file is refused there). Raises IntegrityError."""
    try:
        return safetensors.safe_open(str(path), framework="pt")
    except (safetensors.SafetensorError, OSError) as error:
        raise IntegrityError(f"{path.name}: not a readable safetensors file ({error})") from error


def safetensors_specs(handle: Any, path: Path) -> list[TensorSpec]:
    """Every tensor's name, dtype and shape from an open file's header, in the file's order;
    IntegrityError for a dtype APR does not hold."""
    specs = []
    for name in handle.keys():
        header = handle.get_slice(name)
        dtype = header.get_dtype()
        if dtype not in fmt.DTYPES:
            raise IntegrityError(f"{path.name}: tensor {name} has dtype {dtype}, which APR does not hold "
                                 f"({', '.join(fmt.DTYPES)})")
        specs.append(TensorSpec(name, dtype, tuple(header.get_shape())))
    return specs


def safetensors_chunks(handle: Any, stored: TensorSpec, path: Path) -> Iterator[Any]:
    """The bytes of tensor `stored.name` of an open safetensors file, in `stored.dtype`, read a
    slice of rows at a time (at most about STREAM_CHUNK_BYTES each) and never whole."""
    try:
        piece = handle.get_slice(stored.name)
        shape = tuple(piece.get_shape())
        if not shape or shape[0] == 0:
            rows = [handle.get_tensor(stored.name)]  # a scalar or an empty tensor: nothing to split
        else:
            row_bytes = math.prod(shape[1:]) * fmt.DTYPE_SIZES[piece.get_dtype()]
            step = max(1, STREAM_CHUNK_BYTES // max(1, row_bytes))
            rows = (piece[start:start + step] for start in range(0, shape[0], step))
        for block in rows:
            yield from tensor_chunks(block, fmt.DTYPES[stored.dtype])
    except (safetensors.SafetensorError, OSError) as error:
        raise IntegrityError(f"{path.name}: tensor {stored.name} cannot be read ({error})") from error


def _stored_spec(spec: TensorSpec, dtype: torch.dtype | None) -> TensorSpec:
    """`spec` as stored: floating-point tensors in `dtype` when one is given."""
    if dtype is None or not fmt.DTYPES[spec.dtype].is_floating_point:
        return spec
    return TensorSpec(spec.name, fmt.DTYPE_NAMES[dtype], spec.shape)


def load_config(path: str | os.PathLike[str]) -> ModelConfig:
    """A ModelConfig from a JSON file of its fields (`ModelConfig.to_dict()`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise InputError(f"{path}: no such file") from error
    except (UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(data, dict):
        raise InputError(f"{path}: must hold a JSON object of ModelConfig fields")
    return ModelConfig.from_dict(data)


def _apr_metadata(handle: Any, path: Path) -> dict[str, Any]:
    """The APR metadata a converted file carries, else that of a plain safetensors file."""
    stored = handle.metadata() or {}
    if METADATA_KEY in stored:
        try:
            metadata = json.loads(stored[METADATA_KEY])
        except ValueError as error:
            raise IntegrityError(f"{path.name}: metadata {METADATA_KEY} is not JSON") from error
        if not isinstance(metadata, dict):
            raise IntegrityError(f"{path.name}: metadata {METADATA_KEY} is not a JSON object")
        return metadata
    return {"kind": "weights", "producer": {"shipkit_version": __version__, "source": path.name}}
