"""The tokenize stage: train a byte-level BPE on a corpus's train split, encode both splits into
`.tok` token shards, and read them back memory-mapped (the trainer's view of the data).
Spec of the token folder: `docs/tokens-format.md`.

One job per file:
- `tokenizer`: `train_tokenizer` and `TokenizerConfig`; loading and copying a tokenizer.json.
- `encode`: `encode_corpus` and `EncodeConfig`: EOT-separated documents into shards + manifest.
- `shards`: the folder's format: the shard header, `ShardWriter`, `read_shard`, and
  `read_manifest` / `read_tokens` reading the folder back with every field checked.
"""

from shipkit.tokenize.encode import EncodeConfig, encode_corpus
from shipkit.tokenize.shards import (
    HEADER,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    REENCODE,
    SPLITS,
    ShardInfo,
    ShardWriter,
    TokenSplit,
    read_manifest,
    read_shard,
    read_tokens,
    token_dtype,
)
from shipkit.tokenize.tokenizer import (
    EOT_ID,
    EOT_TOKEN,
    MIN_VOCAB_SIZE,
    TokenizerConfig,
    TokenizerResult,
    copy_tokenizer,
    id_space,
    load_tokenizer,
    new_tokenizer,
    train_tokenizer,
)

__all__ = [
    "EOT_ID",
    "EOT_TOKEN",
    "HEADER",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MIN_VOCAB_SIZE",
    "REENCODE",
    "SPLITS",
    "EncodeConfig",
    "ShardInfo",
    "ShardWriter",
    "TokenSplit",
    "TokenizerConfig",
    "TokenizerResult",
    "copy_tokenizer",
    "encode_corpus",
    "id_space",
    "load_tokenizer",
    "new_tokenizer",
    "read_manifest",
    "read_shard",
    "read_tokens",
    "token_dtype",
    "train_tokenizer",
]
