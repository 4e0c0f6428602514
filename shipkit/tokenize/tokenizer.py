"""The tokenizer: train shipkit's byte-level BPE on a corpus's train split, load a
tokenizer.json, and copy one (with its companion files) into a folder.

shipkit's own tokenizers use `<|endoftext|>` with id 0 as the document separator; an imported
model's tokenizer brings its own (e.g. Qwen2's `<|endoftext|>` after its BPE vocabulary).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from shipkit.corpus import iter_texts, read_corpus_manifest
from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import atomic_write, make_out_dir, sha256_file
from shipkit.layout import TOKENIZER_FILE
from shipkit.tokenizer_contract import CARRIED_FILES

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 0  # in the tokenizers shipkit trains (the only special token, added first)

BYTE_ALPHABET_SIZE = 256  # byte-level BPE starts from one token per byte
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + 1  # ... plus the end-of-text token
MAX_VOCAB_SIZE = 1 << 32  # token shards store ids in at most 32 bits


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    min_frequency: int = 2  # a pair seen once is not worth a merge


@dataclass(frozen=True)
class TokenizerResult:
    """What `train_tokenizer` wrote; `vocab_size` can come out smaller than asked when the corpus
    has fewer distinct pairs than that."""

    path: Path
    sha256: str
    vocab_size: int
    train_docs: int

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "sha256": self.sha256, "vocab_size": self.vocab_size,
                "train_docs": self.train_docs}


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE splitting text with the GPT-2 regex (llama.cpp pre "gpt-2")."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    corpus_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], config: TokenizerConfig | None = None
) -> TokenizerResult:
    """Train on the corpus's train split only and write `out_dir/tokenizer.json`.

    The texts come through `iter_texts`, which refuses a document past the corpus bounds
    (MAX_DOCUMENT_BYTES, MAX_LINE_CHARS), so the tokenizers library is never handed a
    pathological one.
    """
    config = config or TokenizerConfig()
    if config.vocab_size < MIN_VOCAB_SIZE:
        raise InputError(f"vocab_size {config.vocab_size} is too small: byte-level BPE needs at least "
                         f"{MIN_VOCAB_SIZE} (256 bytes + {EOT_TOKEN})")
    if config.vocab_size > MAX_VOCAB_SIZE:
        raise InputError(f"vocab_size {config.vocab_size} is too large: token shards hold ids of at most 32 bits")
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
    path = Path(out_dir) / TOKENIZER_FILE
    with atomic_write(path, "w") as handle:
        handle.write(tokenizer.to_str(pretty=True))
    return TokenizerResult(path, sha256_file(path), tokenizer.get_vocab_size(), train["docs"])


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
        origin = source if name == TOKENIZER_FILE else source.parent / name
        target = target_dir / name
        if origin.is_file():
            if origin.resolve() != target.resolve():
                with open(origin, "rb") as handle, atomic_write(target, "wb") as out:
                    shutil.copyfileobj(handle, out)
        elif name != TOKENIZER_FILE:
            target.unlink(missing_ok=True)
