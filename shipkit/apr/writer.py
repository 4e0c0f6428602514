"""Writing APR v2 files (layout in `shipkit.apr.format`, spec in docs/apr-format.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from shipkit.apr import format as fmt
from shipkit.errors import InputError
from shipkit.fsutil import atomic_write
from shipkit.model import ModelConfig


def write_apr(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
              metadata: Mapping[str, Any]) -> None:
    """Atomically write `tensors` (in mapping order) and JSON `metadata` to `path`.

    Each tensor is hashed once and written once. Raises InputError for a bad tensor name or
    dtype, metadata that is not JSON or lacks a valid `kind`, or (kind "weights" with a
    `config`) a tensor count the config does not imply.
    """
    _check_metadata(metadata, len(tensors))
    payloads = {name: _tensor_bytes(name, tensor) for name, tensor in tensors.items()}
    entries, end = [], 0
    for name, tensor in tensors.items():
        offset = fmt.align(end)
        payload = payloads[name]
        entries.append({
            "name": name,
            "dtype": fmt.DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "offset": offset,
            "nbytes": payload.nbytes,
            "xxh3": fmt.digest_hex(fmt.checksum(payload)),
        })
        end = offset + payload.nbytes
    index = _encode_index(metadata, entries)
    data_offset = fmt.align(fmt.HEADER_SIZE + len(index))
    file_size = data_offset + end + fmt.FOOTER_SIZE
    index_region = index + bytes(data_offset - fmt.HEADER_SIZE - len(index))
    header = fmt.HEADER_STRUCT.pack(fmt.MAGIC, fmt.VERSION, 0, len(entries), len(index),
                                    data_offset, end, file_size, 0)
    digest = fmt.header_digest(header, index_region).to_bytes(8, "little")
    header = header[: fmt.HEADER_DIGEST_OFFSET] + digest
    with atomic_write(path, "wb") as handle:
        handle.write(header)
        handle.write(index_region)
        written = 0
        for entry in entries:
            handle.write(bytes(entry["offset"] - written))
            handle.write(payloads[entry["name"]])
            written = entry["offset"] + entry["nbytes"]
        handle.write(fmt.FOOTER_STRUCT.pack(fmt.FOOTER_MAGIC, file_size))


def _tensor_bytes(name: str, tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes (little-endian) as a flat uint8 array; no copy if already contiguous."""
    why = fmt.name_problem(name)
    if why:
        raise InputError(f"tensor name {name!r}: {why}")
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"tensor {name}: not a torch.Tensor ({type(tensor).__name__})")
    if tensor.dtype not in fmt.DTYPE_NAMES:
        raise InputError(f"tensor {name}: dtype {tensor.dtype} is not supported by APR "
                         f"(supported: {', '.join(fmt.DTYPES)})")
    if tensor.numel() == 0:  # an empty tensor may carry strides that forbid a byte view
        return np.empty(0, dtype=np.uint8)
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


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
