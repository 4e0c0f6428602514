"""What each scored GGUF is, for the per-file section of a run over several files: its file type
as llama-quantize names it, its bits per weight, the importance matrix it was made with (from the
keys llama-quantize writes), and its tokenizer keys (every file of one release must carry the
tokenizer the primary file's check read)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from shipkit.contract import file_type_name
from shipkit.fsutil import sha256_file
from shipkit.quantize.gguf_export import (
    IMATRIX_CHUNKS_KEY,
    IMATRIX_DATASET_KEY,
    IMATRIX_ENTRIES_KEY,
    IMATRIX_FILE_KEY,
)
from shipkit.quantize.gguf_load import open_gguf

FILE_TYPE_KEY = "general.file_type"
TOKENIZER_KEY_PREFIX = "tokenizer."
# The dataset name `shipkit imatrix` gives its calibration (shipkit.imatrix.format.Calibration.
# dataset_name), which llama-quantize copies into the GGUF: the split and its hash.
SHIPKIT_DATASET = re.compile(r"shipkit-tokens (?P<split>\S+) sha256:(?P<sha256>[0-9a-f]{64})")


@dataclass
class GgufFacts:
    path: Path
    sha256: str
    nbytes: int  # the file's size
    file_type: str  # "Q4_K_M", "BF16", or "unknown(N)" / "unknown"
    file_type_id: int | None  # general.file_type as stored
    tensor_types: dict[str, int]  # GGML type name -> tensors
    tensor_bytes: int
    weights: int  # elements of every tensor
    imatrix: dict[str, Any] | None
    tokenizer_keys: dict[str, str]  # tokenizer.* key -> sha256 of its stored bytes

    @property
    def bits_per_weight(self) -> float:
        """As llama.cpp's loader prints it: tensor data bits over tensor elements."""
        return 8 * self.tensor_bytes / self.weights

    def tokenizer_difference(self, other: GgufFacts) -> str | None:
        """The first tokenizer key this file stores otherwise than (or unlike) `other`, or None."""
        for key in sorted(set(self.tokenizer_keys) | set(other.tokenizer_keys)):
            if self.tokenizer_keys.get(key) != other.tokenizer_keys.get(key):
                return key
        return None


def gguf_facts(path: Path) -> GgufFacts:
    """Read `path`'s header (and hash the file) for its per-file section."""
    reader = open_gguf(path)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    field = reader.fields.get(FILE_TYPE_KEY)
    file_type_id = int(field.contents()) if field is not None else None
    return GgufFacts(
        path=path,
        sha256=sha256_file(path),
        nbytes=path.stat().st_size,
        file_type=file_type_name(file_type_id) if file_type_id is not None else "unknown",
        file_type_id=file_type_id,
        tensor_types=dict(sorted(counts.items())),
        tensor_bytes=sum(int(tensor.n_bytes) for tensor in reader.tensors),
        weights=sum(int(tensor.n_elements) for tensor in reader.tensors),
        imatrix=_imatrix(reader, path),
        tokenizer_keys={name: _digest(field) for name, field in reader.fields.items()
                        if name.startswith(TOKENIZER_KEY_PREFIX)},
    )


def imatrix_keys(reader: gguf.GGUFReader) -> dict[str, Any] | None:
    """llama-quantize's record of the importance matrix a GGUF was made with, None without one:
    the imatrix file's name, its first dataset name, entry and chunk counts (None where absent)."""
    keys = {"file": IMATRIX_FILE_KEY, "dataset": IMATRIX_DATASET_KEY, "entries": IMATRIX_ENTRIES_KEY,
            "chunks": IMATRIX_CHUNKS_KEY}
    found = {name: reader.fields[key].contents() if key in reader.fields else None for name, key in keys.items()}
    return found if any(value is not None for value in found.values()) else None


def dataset_split(dataset: str | None) -> tuple[str, str] | None:
    """(split, split sha256) from a dataset name `shipkit imatrix` wrote, else None."""
    match = SHIPKIT_DATASET.fullmatch(dataset or "")
    return (match["split"], match["sha256"]) if match else None


def _imatrix(reader: gguf.GGUFReader, path: Path) -> dict[str, Any] | None:
    """`imatrix_keys`, with the sha256 of the imatrix file where it lies beside the GGUF under the
    name it records, and the calibration split's hash where a shipkit dataset name gives it."""
    record = imatrix_keys(reader)
    if record is None:
        return None
    beside = path.parent / record["file"] if record["file"] else None
    split = dataset_split(record["dataset"])
    return {**record, "sha256": sha256_file(beside) if beside is not None and beside.is_file() else None,
            "split_sha256": split[1] if split else None}


def _digest(field: gguf.ReaderField) -> str:
    """sha256 of a key's stored type and value bytes: equal digests, equal values."""
    digest = hashlib.sha256()
    for part in field.parts:
        digest.update(part.tobytes())
    return digest.hexdigest()
