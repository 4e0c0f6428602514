"""APR v2: the checkpoint container (named tensors + JSON metadata, checksummed, mmap-able).

Spec: docs/apr-format.md. Constants live in `format`, reading and validation in `reader`,
writing in `writer`, safetensors conversion in `convert`.
"""

from shipkit.apr.reader import (
    AprCheckpoint,
    AprIndex,
    TensorInfo,
    ValidationReport,
    inspect_apr,
    read_apr,
    validate_apr,
)
from shipkit.apr.writer import write_apr

__all__ = [
    "AprCheckpoint",
    "AprIndex",
    "TensorInfo",
    "ValidationReport",
    "inspect_apr",
    "read_apr",
    "validate_apr",
    "write_apr",
]
