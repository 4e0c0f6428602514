"""APR v2: the checkpoint container (named tensors + JSON metadata, checksummed, mmap-able).

Spec: docs/apr-format.md. Constants live in `format`; the header, index and footer are parsed
in `index`, the metadata checked in `metadata`; validating, inspecting and reading (tensor data
and its checksums) in `reader`; writing (streamed, tensor by tensor) in `writer`; safetensors
conversion in `convert`.
"""

from shipkit.apr.index import AprIndex, TensorInfo
from shipkit.apr.metadata import checked_tokenizer_name
from shipkit.apr.reader import (
    AprCheckpoint,
    ValidationReport,
    inspect_apr,
    read_apr,
    validate_apr,
)
from shipkit.apr.writer import (
    AprWriter,
    TensorSpec,
    apr_writer,
    tensor_chunks,
    write_apr,
)

__all__ = [
    "AprCheckpoint",
    "AprIndex",
    "AprWriter",
    "TensorInfo",
    "TensorSpec",
    "ValidationReport",
    "apr_writer",
    "checked_tokenizer_name",
    "inspect_apr",
    "read_apr",
    "tensor_chunks",
    "validate_apr",
    "write_apr",
]
