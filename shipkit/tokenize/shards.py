"""The token folder's format: `.tok` shards (written atomically, memory-mapped back with the
header checked against the file's size) and manifest.json read back with every field checked.

Shard layout (`docs/tokens-format.md`): a 32-byte little-endian header — magic, version, bytes
per token, token count, document count — then the tokens. `read_tokens` is the trainer's view
of one split.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import (
    atomic_write,
    confined_name,
    manifest_field,
    read_format_json,
    sha256_file,
)

TOKEN_MAGIC = b"SHIPTOK\x00"
TOKEN_FORMAT_VERSION = 1
# magic, version, bytes per token, token count, document count; 32 bytes keeps tokens aligned.
HEADER = struct.Struct("<8sIIQQ")
DTYPE_BY_WIDTH = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
UINT16_VOCAB_LIMIT = 1 << 16

SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "shipkit-tokens/1"
REENCODE = "re-run `shipkit tokenize encode`"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in 16 bits, else uint32."""
    return DTYPE_BY_WIDTH[2] if vocab_size <= UINT16_VOCAB_LIMIT else DTYPE_BY_WIDTH[4]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tok"


@dataclass(frozen=True)
class ShardInfo:
    """What `manifest.json` records for one shard."""

    file: str
    tokens: int
    docs: int
    sha256: str

    def to_dict(self) -> dict[str, object]:
        return {"file": self.file, "tokens": self.tokens, "docs": self.docs, "sha256": self.sha256}


class ShardWriter:
    """Writes one `.tok` shard atomically: header placeholder, tokens, then the real header."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.tokens = 0
        self.docs = 0
        self._context = atomic_write(path, "wb")
        self._handle: IO[bytes] = self._context.__enter__()
        self._handle.write(self._header())

    def _header(self) -> bytes:
        return HEADER.pack(TOKEN_MAGIC, TOKEN_FORMAT_VERSION, self.dtype.itemsize, self.tokens, self.docs)

    def write_docs(self, tokens: np.ndarray, docs: int) -> None:
        """Append already EOT-separated tokens holding `docs` documents."""
        self._handle.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.tokens += len(tokens)
        self.docs += docs

    def close(self) -> ShardInfo:
        self._handle.seek(0)
        self._handle.write(self._header())
        self._context.__exit__(None, None, None)
        return ShardInfo(self.path.name, self.tokens, self.docs, sha256_file(self.path))

    def abort(self, error: BaseException) -> None:
        self._context.__exit__(type(error), error, error.__traceback__)


def read_shard(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map one shard's tokens after checking its header against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(HEADER.size)
    except OSError as error:
        raise IntegrityError(f"{path}: cannot read token shard: {error.strerror}") from error
    if len(header) < HEADER.size:
        raise IntegrityError(f"{path}: {size} bytes, shorter than the {HEADER.size}-byte token header")
    magic, version, width, tokens, _docs = HEADER.unpack(header)
    if magic != TOKEN_MAGIC:
        raise IntegrityError(f"{path}: bad magic {magic!r}, not a shipkit token shard")
    if version != TOKEN_FORMAT_VERSION:
        raise IntegrityError(
            f"{path}: token format version {version}, this shipkit reads version {TOKEN_FORMAT_VERSION}"
        )
    if width not in DTYPE_BY_WIDTH:
        raise IntegrityError(f"{path}: token width {width} bytes, expected 2 (uint16) or 4 (uint32)")
    expected = HEADER.size + tokens * width
    if size != expected:
        raise IntegrityError(
            f"{path}: {size} bytes but the header promises {tokens} tokens ({expected} bytes); "
            "the shard is truncated or corrupt, re-run `shipkit tokenize encode`"
        )
    if tokens == 0:
        return np.zeros(0, dtype=DTYPE_BY_WIDTH[width])
    return np.memmap(path, dtype=DTYPE_BY_WIDTH[width], mode="r", offset=HEADER.size, shape=(tokens,))


@dataclass(frozen=True)
class TokenSplit:
    """One split of a token folder, as the trainer sees it."""

    shards: list[np.ndarray]
    total_tokens: int
    eot_id: int
    tokenizer_sha256: str
    vocab_size: int


def read_manifest(tokens_dir: str | os.PathLike[str]) -> dict:
    """manifest.json, with every field its readers use checked for type and range and every
    shard path kept inside the folder: IntegrityError naming the file and the field."""
    path = Path(tokens_dir) / MANIFEST_NAME
    manifest = read_format_json(path, MANIFEST_FORMAT, "token manifest",
                                  "no token manifest; run `shipkit tokenize encode` first")
    vocab_size = manifest_field(manifest, "vocab_size", int, path, REENCODE, minimum=1)
    eot_id = manifest_field(manifest, "eot_id", int, path, REENCODE, minimum=0)
    if eot_id >= vocab_size:
        raise IntegrityError(f"{path}: field eot_id {eot_id} is outside vocab_size {vocab_size}; {REENCODE}")
    manifest_field(manifest, "tokenizer.sha256", str, path, REENCODE)
    for split in SPLITS:
        for count in ("tokens", "docs"):
            manifest_field(manifest, f"splits.{split}.{count}", int, path, REENCODE, minimum=0)
        for index in range(len(manifest_field(manifest, f"splits.{split}.shards", list, path, REENCODE))):
            _check_shard_entry(manifest, f"splits.{split}.shards.{index}", path)
    return manifest


def _check_shard_entry(manifest: dict, prefix: str, path: Path) -> None:
    confined_name(manifest_field(manifest, f"{prefix}.file", str, path, REENCODE), f"{path}: field {prefix}.file")
    manifest_field(manifest, f"{prefix}.sha256", str, path, REENCODE)
    for count in ("tokens", "docs"):
        manifest_field(manifest, f"{prefix}.{count}", int, path, REENCODE, minimum=0)


def read_tokens(tokens_dir: str | os.PathLike[str], split: str) -> TokenSplit:
    """Memory-map every shard of `split` ("train" or "val") listed in the folder's manifest.

    Raises IntegrityError naming the file when a header is bad, a shard's token count differs
    from the manifest or a token id is outside the manifest's vocabulary; InputError when the
    folder has no manifest or the split is unknown.
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    tokens_dir = Path(tokens_dir)
    manifest = read_manifest(tokens_dir)
    shards = []
    for info in manifest["splits"][split]["shards"]:
        shard = read_shard(tokens_dir / info["file"])
        if len(shard) != info["tokens"]:
            raise IntegrityError(
                f"{tokens_dir / info['file']}: {len(shard)} tokens but {MANIFEST_NAME} lists {info['tokens']}"
            )
        largest_id = int(shard.max()) if len(shard) else -1
        if largest_id >= manifest["vocab_size"]:
            raise IntegrityError(
                f"{tokens_dir / info['file']}: token id {largest_id} is outside the vocabulary "
                f"of {manifest['vocab_size']} in {MANIFEST_NAME}; re-run `shipkit tokenize encode`"
            )
        shards.append(shard)
    return TokenSplit(
        shards=shards,
        total_tokens=sum(len(shard) for shard in shards),
        eot_id=manifest["eot_id"],
        tokenizer_sha256=manifest["tokenizer"]["sha256"],
        vocab_size=manifest["vocab_size"],
    )
