"""`shipkit tokenize train` and `shipkit tokenize encode`: a byte-level BPE and token shards."""

from __future__ import annotations

from pathlib import Path

import click

from shipkit.commands.common import StageValue, emit, flag_spelling, json_option


@click.group()
def tokenize() -> None:
    """Train the tokenizer and encode a corpus folder into token shards."""


@tokenize.command()
@click.argument("corpus_dir", type=click.Path(path_type=Path))
@click.option("--out", "tokens_dir", required=True, type=click.Path(path_type=Path),
              help="The token folder; tokenizer.json is written there.")
@click.option("--vocab-size", type=int, default=StageValue("shipkit.tokenize", "TokenizerConfig.vocab_size"),
              show_default=True, help="Vocabulary size, end-of-text token included.")
@click.option("--min-frequency", type=click.IntRange(min=1),
              default=StageValue("shipkit.tokenize", "TokenizerConfig.min_frequency"),
              show_default=True, help="Merge only pairs seen at least this often.")
@json_option
def train(corpus_dir: Path, tokens_dir: Path, vocab_size: int, min_frequency: int, as_json: bool) -> None:
    """Train a byte-level BPE on CORPUS_DIR's train split."""
    from shipkit.tokenize import TokenizerConfig, train_tokenizer

    with flag_spelling(out_dir="--out", vocab_size="--vocab-size"):
        result = train_tokenizer(corpus_dir, tokens_dir, TokenizerConfig(vocab_size, min_frequency))
    emit(result, as_json, lambda r: f"{r.path}: vocab {r.vocab_size}, trained on {r.train_docs} docs, "
                                    f"sha256 {r.sha256}")


@tokenize.command()
@click.argument("corpus_dir", type=click.Path(path_type=Path))
@click.option("--out", "tokens_dir", required=True, type=click.Path(path_type=Path),
              help="The token folder to write shards and manifest.json into.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="tokenizer.json to use (copied into --out) [default: the one in --out].")
@click.option("--shard-tokens", type=click.IntRange(min=1),
              default=StageValue("shipkit.tokenize", "EncodeConfig.shard_tokens"),
              show_default=True, help="Most tokens in one shard; documents are never cut.")
@json_option
def encode(corpus_dir: Path, tokens_dir: Path, tokenizer_path: Path | None, shard_tokens: int,
           as_json: bool) -> None:
    """Encode both splits of CORPUS_DIR into EOT-separated token shards."""
    from shipkit.tokenize import EncodeConfig, encode_corpus

    with flag_spelling(tokens_dir="--out"):
        manifest = encode_corpus(corpus_dir, tokens_dir, tokenizer_path, EncodeConfig(shard_tokens=shard_tokens))
    emit(manifest, as_json, lambda m: _render(m, tokens_dir))


def _render(manifest: dict, tokens_dir: Path) -> str:
    parts = [f"{split} {info['tokens']} tokens / {info['docs']} docs / {len(info['shards'])} shard(s)"
             for split, info in manifest["splits"].items()]
    return f"{tokens_dir}: {', '.join(parts)}; {manifest['dtype']}, vocab {manifest['vocab_size']}"


commands = [tokenize]
