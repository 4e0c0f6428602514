"""Token shards: train a byte-level BPE on a corpus's train split, encode both splits into
`.tok` shards, and read them back memory-mapped (the trainer's view of the data).

Shard layout (`docs/tokens-format.md`): a 32-byte little-endian header — magic, version, bytes
per token, token count, document count — then the tokens. Every document is preceded by the
tokenizer's document separator (its end-of-text token), so a shard reads `EOT doc EOT doc ...` and
holds as many EOTs as documents. shipkit's own tokenizers use `<|endoftext|>` with id 0; an
imported model's tokenizer brings its own (e.g. Qwen2's `<|endoftext|>` after its BPE vocabulary).
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from shipkit.corpus import iter_texts, read_corpus_manifest
from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import (
    atomic_write,
    confined_name,
    make_out_dir,
    manifest_field,
    read_format_json,
    sha256_file,
    write_json,
)
from shipkit.tokenizer_contract import CARRIED_FILES, read_contract

TOKEN_MAGIC = b"SHIPTOK\x00"
TOKEN_FORMAT_VERSION = 1
# magic, version, bytes per token, token count, document count; 32 bytes keeps tokens aligned.
HEADER = struct.Struct("<8sIIQQ")
DTYPE_BY_WIDTH = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
UINT16_VOCAB_LIMIT = 1 << 16

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 0  # in the tokenizers shipkit trains (the only special token, added first)
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
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


# --- training the tokenizer -----------------------------------------------------------------

BYTE_ALPHABET_SIZE = 256  # byte-level BPE starts from one token per byte
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + 1  # ... plus the end-of-text token
MAX_VOCAB_SIZE = 1 << 32  # token shards store ids in at most 32 bits


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    min_frequency: int = 2  # a pair seen once is not worth a merge


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE splitting text with the GPT-2 regex (llama.cpp pre "gpt-2")."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    corpus_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], config: TokenizerConfig | None = None
) -> dict:
    """Train on the corpus's train split only and write `out_dir/tokenizer.json`.

    Returns {"path", "sha256", "vocab_size", "train_docs"}; the vocabulary can come out smaller
    than asked when the corpus has fewer distinct pairs than that. The texts come through
    `iter_texts`, which refuses a document past the corpus bounds (MAX_DOCUMENT_BYTES,
    MAX_LINE_CHARS), so the tokenizers library is never handed a pathological one.
    """
    config = config or TokenizerConfig()
    if config.vocab_size < MIN_VOCAB_SIZE:
        raise InputError(f"--vocab-size {config.vocab_size} is too small: byte-level BPE needs at least "
                         f"{MIN_VOCAB_SIZE} (256 bytes + {EOT_TOKEN})")
    if config.vocab_size > MAX_VOCAB_SIZE:
        raise InputError(f"--vocab-size {config.vocab_size} is too large: token shards hold ids of at most 32 bits")
    make_out_dir(Path(out_dir))
    train = read_corpus_manifest(corpus_dir)["splits"]["train"]
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = tqdm(iter_texts(corpus_dir, "train"), total=train["docs"], desc="train tokenizer",
                 unit="doc", disable=None)
    tokenizer.train_from_iterator(texts, trainer, length=train["docs"])
    path = Path(out_dir) / TOKENIZER_NAME
    with atomic_write(path, "w") as handle:
        handle.write(tokenizer.to_str(pretty=True))
    return {"path": str(path), "sha256": sha256_file(path), "vocab_size": tokenizer.get_vocab_size(),
            "train_docs": train["docs"]}


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no tokenizer; run `shipkit tokenize train` first")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises plain Exception for a malformed file
        raise IntegrityError(f"{path}: not a tokenizers tokenizer.json: {error}") from error


def id_space(tokenizer: Tokenizer) -> int:
    """One past the largest token id, added tokens included: ids need not be contiguous (an
    imported tokenizer can place its special tokens anywhere below the model's embedding)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def copy_tokenizer(source: Path, target_dir: Path) -> None:
    """Copy `source` (a tokenizer.json) and the companion files beside it (tokenizer_config.json,
    chat template, ...) into `target_dir`; companions the source lacks are removed there, so
    the folder describes one tokenizer."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in CARRIED_FILES:
        origin = source if name == TOKENIZER_NAME else source.parent / name
        target = target_dir / name
        if origin.is_file():
            if origin.resolve() != target.resolve():
                with open(origin, "rb") as handle, atomic_write(target, "wb") as out:
                    shutil.copyfileobj(handle, out)
        elif name != TOKENIZER_NAME:
            target.unlink(missing_ok=True)


# --- encoding -------------------------------------------------------------------------------


@dataclass
class EncodeConfig:
    shard_tokens: int = 1 << 28  # a shard holds at most this many tokens (one larger doc excepted)
    # Text handed to one encode_batch call: bounds memory; larger batches cost the same CPU time
    # on the stdlib corpus (measured 1-16 MiB) but hold more Encoding objects at once.
    batch_bytes: int = 1 << 20


def _batches(texts: Iterable[str], batch_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _eot_separated(encodings: list, dtype: np.dtype, separator_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens `EOT doc EOT doc ...`, end offset of each document in them)."""
    lengths = np.fromiter((len(encoding.ids) + 1 for encoding in encodings), dtype=np.int64,
                          count=len(encodings))
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]), dtype=dtype)
    for encoding, end, length in zip(encodings, ends, lengths, strict=True):
        start = end - length
        tokens[start] = separator_id
        tokens[start + 1 : end] = encoding.ids
    return tokens, ends


def _encode_ahead(tokenizer: Tokenizer, batches: Iterator[list[str]]) -> Iterator[list]:
    """Encodings of each batch, in order. encode_batch_fast releases the GIL, so batch k is
    encoded in a worker thread while the caller writes batch k-1 and reads batch k+1."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            submitted = pool.submit(tokenizer.encode_batch_fast, batch, add_special_tokens=False)
            if pending is not None:
                yield pending.result()
            pending = submitted
        if pending is not None:
            yield pending.result()


class _SplitEncoder:
    """Streams one split into shards of at most `shard_tokens`, never cutting a document."""

    def __init__(self, tokens_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.tokens_dir = tokens_dir
        self.split = split
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self.writer: ShardWriter | None = None

    def add(self, tokens: np.ndarray, ends: np.ndarray) -> None:
        """Append EOT-separated documents; `ends[i]` is where document i ends in `tokens`."""
        start_doc = 0
        while start_doc < len(ends):
            if self.writer is None:
                self.writer = ShardWriter(self.tokens_dir / shard_name(self.split, len(self.shards)), self.dtype)
            offset = int(ends[start_doc - 1]) if start_doc else 0
            room = self.shard_tokens - self.writer.tokens
            fit = int(np.searchsorted(ends[start_doc:] - offset, room, side="right"))
            if fit == 0 and self.writer.tokens == 0:
                fit = 1
            if fit:
                end_doc = start_doc + fit
                self.writer.write_docs(tokens[offset : int(ends[end_doc - 1])], fit)
                start_doc = end_doc
            if start_doc < len(ends):
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.shards.append(self.writer.close())
            self.writer = None

    def abort(self, error: BaseException) -> None:
        if self.writer is not None:
            self.writer.abort(error)
            self.writer = None


def encode_corpus(
    corpus_dir: str | os.PathLike[str],
    tokens_dir: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    config: EncodeConfig | None = None,
) -> dict:
    """Encode both splits of `corpus_dir` into `tokens_dir`; return the manifest written.

    The tokenizer defaults to `tokens_dir/tokenizer.json`; another one is copied there first,
    with its companion files (tokenizer_config.json, ...). Documents are separated by the
    tokenizer's own end-of-text token (`TokenizerContract.separator_id`). Memory stays bounded by
    `config.batch_bytes` of text and its tokens; encode_batch runs on
    every core (set TOKENIZERS_PARALLELISM=false or RAYON_NUM_THREADS to limit it).
    """
    config = config or EncodeConfig()
    corpus_dir, tokens_dir = Path(corpus_dir), Path(tokens_dir)
    make_out_dir(tokens_dir)
    corpus = read_corpus_manifest(corpus_dir)
    # Shards are about to be replaced: a run that dies half-way must not leave an old manifest
    # describing them.
    (tokens_dir / MANIFEST_NAME).unlink(missing_ok=True)
    target = tokens_dir / TOKENIZER_NAME
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != target.resolve():
        load_tokenizer(tokenizer_path)
        copy_tokenizer(Path(tokenizer_path), tokens_dir)
    tokenizer = load_tokenizer(target)
    separator_id = read_contract(target).separator_id
    # A document that spells out "<|endoftext|>" must not produce a document boundary.
    tokenizer.encode_special_tokens = True
    vocab_size = id_space(tokenizer)
    dtype = token_dtype(vocab_size)
    splits = {}
    for split in SPLITS:
        encoder = _SplitEncoder(tokens_dir, split, dtype, config.shard_tokens)
        progress = tqdm(total=corpus["splits"][split]["docs"], desc=f"encode {split}", unit="doc", disable=None)
        try:
            for encodings in _encode_ahead(tokenizer, _batches(iter_texts(corpus_dir, split), config.batch_bytes)):
                encoder.add(*_eot_separated(encodings, dtype, separator_id))
                progress.update(len(encodings))
        except BaseException as error:
            encoder.abort(error)
            raise
        finally:
            progress.close()
        encoder.close()
        splits[split] = {
            "tokens": sum(shard.tokens for shard in encoder.shards),
            "docs": sum(shard.docs for shard in encoder.shards),
            "shards": [shard.to_dict() for shard in encoder.shards],
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": {"file": TOKENIZER_NAME, "sha256": sha256_file(target)},
        "vocab_size": vocab_size,
        "eot_id": separator_id,
        "eot_token": tokenizer.id_to_token(separator_id),
        "dtype": dtype.name,
        "corpus": {"sha256": sha256_file(corpus_dir / "corpus.json"), "split": corpus["split"]},
        "splits": splits,
        "total_tokens": sum(info["tokens"] for info in splits.values()),
    }
    keep = {shard["file"] for info in splits.values() for shard in info["shards"]}
    for split in SPLITS:
        for stale in tokens_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].tok"):
            if stale.name not in keep:
                stale.unlink()
    write_json(tokens_dir / MANIFEST_NAME, manifest)
    return manifest
