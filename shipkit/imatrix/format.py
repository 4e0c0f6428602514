"""llama.cpp's importance matrix files and shipkit's calibration record: every constant in one
place (spec: docs/imatrix.md).

GGUF imatrix (what `llama-imatrix -o x.gguf` writes and `llama-quantize --imatrix` reads,
common/imatrix-loader.cpp): keys `general.type = "imatrix"`, `imatrix.datasets` (array of
strings), `imatrix.chunk_count` and `imatrix.chunk_size` (uint32); per weight matrix NAME two
F32 tensors, `NAME.in_sum2` of numpy shape (n_mat, n_cols) — the sum over tokens of the squared
input activation per input column — and `NAME.counts` of shape (n_mat, 1) — the tokens summed.
A dense model has n_mat = 1.

Legacy `.dat` (llama.cpp's format before the GGUF one, still read as a fallback), little-endian:
int32 entry count, then per entry int32 name length, the name, int32 ncall, int32 nval and nval
float32 values (sum/count × ncall); then optionally int32 chunk count, int32 length and a dataset
name.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import asdict, dataclass
from typing import Any

import gguf

IMATRIX_TYPE = gguf.GGUFType.IMATRIX  # general.type
DATASETS_KEY = gguf.Keys.IMatrix.DATASETS
CHUNK_COUNT_KEY = gguf.Keys.IMatrix.CHUNK_COUNT
CHUNK_SIZE_KEY = gguf.Keys.IMatrix.CHUNK_SIZE
# llama-quantize refuses a GGUF imatrix without all three ("missing imatrix metadata").
REQUIRED_KEYS = (DATASETS_KEY, CHUNK_COUNT_KEY, CHUNK_SIZE_KEY)
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"

LEGACY_INT = struct.Struct("<i")
LEGACY_FLOAT_BYTES = 4
GGUF_MAGIC = b"GGUF"

# The calibration record: shipkit's own GGUF keys (llama.cpp ignores keys it does not know).
CALIBRATION_KEY_PREFIX = "shipkit.calibration."
# The split the calibration is drawn from; the val split is what the parity gate scores.
CALIBRATION_SPLIT = "train"


@dataclass(frozen=True)
class Calibration:
    """What an imatrix was computed on. The split hashes are `split_sha256` of the tokens
    folder's manifest, so a gate can compare them with the folder it scores."""

    # the tokens folder's name: not its path, as the file is released and a local path tells
    # its readers nothing (manifest_sha256 is the identity)
    source: str
    manifest_sha256: str  # sha256 of its manifest.json: which tokenization of which corpus
    split: str  # CALIBRATION_SPLIT
    split_sha256: str  # the calibration split's hash
    train_sha256: str
    val_sha256: str
    tokens: int  # tokens run through the model (chunks × ctx), each counted once
    chunks: int
    ctx: int
    tokens_sha256: str  # sha256 of the chunks' token ids as the model saw them, uint32 LE
    bos_id: int | None  # the token written over each chunk's first one (llama-imatrix's BOS), if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def dataset_name(self) -> str:
        """The imatrix.datasets entry: llama-quantize copies the first into the quantized GGUF
        (quantize.imatrix.dataset, at most 127 characters), so it names the split by its hash."""
        return f"shipkit-tokens {self.split} sha256:{self.split_sha256}"


# Calibration fields -> the GGUF value type of their key (None values are not written).
CALIBRATION_KEY_TYPES: dict[str, gguf.GGUFValueType] = {
    "source": gguf.GGUFValueType.STRING,
    "manifest_sha256": gguf.GGUFValueType.STRING,
    "split": gguf.GGUFValueType.STRING,
    "split_sha256": gguf.GGUFValueType.STRING,
    "train_sha256": gguf.GGUFValueType.STRING,
    "val_sha256": gguf.GGUFValueType.STRING,
    "tokens": gguf.GGUFValueType.UINT64,
    "chunks": gguf.GGUFValueType.UINT32,
    "ctx": gguf.GGUFValueType.UINT32,
    "tokens_sha256": gguf.GGUFValueType.STRING,
    "bos_id": gguf.GGUFValueType.UINT32,
}


def split_sha256(manifest: dict[str, Any], split: str) -> str:
    """A split's identity from a tokens manifest: sha256 of its shards' sha256s, one per line in
    manifest order. Content only (shard file names differ between splits), and read without
    hashing the shards again."""
    listing = "".join(f"{shard['sha256']}\n" for shard in manifest["splits"][split]["shards"])
    return hashlib.sha256(listing.encode("ascii")).hexdigest()
