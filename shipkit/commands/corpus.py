"""`shipkit corpus build`: sources in, a leak-free train/val corpus folder out."""

from __future__ import annotations

from pathlib import Path

import click

from shipkit.commands.common import StageValue, emit, flag_spelling, json_option

MIB = 1 << 20


@click.group()
def corpus() -> None:
    """Build the text corpus that the tokenizer and the model are trained on."""


@corpus.command()
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="The corpus folder to write.")
@click.option("--val-fraction", type=float, default=StageValue("shipkit.corpus", "CorpusConfig.val_fraction"),
              show_default=True, help="Share of documents, drawn by content hash, that go to the val split.")
@click.option("--seed", type=int, default=StageValue("shipkit.corpus", "CorpusConfig.seed"), show_default=True,
              help="Seed of the hash-based split.")
@click.option("--text-column", default=None,
              help="Text column of parquet/JSONL sources [default: first of content, code, "
                   "whole_func_string, func_code_string, text].")
@click.option("--glob", "glob", type=str, default=StageValue("shipkit.corpus", "CorpusConfig.glob"),
              show_default=True, help="Files taken from a source folder (searched recursively).")
@click.option("--shard-mb", type=click.IntRange(min=1),
              default=StageValue("shipkit.corpus", "CorpusConfig.shard_bytes", lambda size: size // MIB),
              show_default=True, help="Close a JSONL shard once it holds this many MiB.")
@json_option
def build(sources: tuple[Path, ...], out_dir: Path, val_fraction: float, seed: int,
          text_column: str | None, glob: str, shard_mb: int, as_json: bool) -> None:
    """Normalise, dedup and split SOURCES (parquet, JSONL, folders; default: this Python's
    standard library) into train/val JSONL shards and corpus.json."""
    from shipkit.corpus import CorpusConfig, build_corpus

    config = CorpusConfig(val_fraction=val_fraction, seed=seed, text_column=text_column,
                          glob=glob, shard_bytes=shard_mb * MIB)
    with flag_spelling(out_dir="--out", val_fraction="--val-fraction"):
        manifest = build_corpus(list(sources), out_dir, config)
    emit(manifest, as_json, lambda m: _render(m, out_dir))


def _render(manifest: dict, out_dir: Path) -> str:
    from shipkit.corpus import skipped_summary

    splits = manifest["splits"]
    return (
        f"{out_dir}: train {splits['train']['docs']} docs / {splits['train']['bytes'] / MIB:.1f} MiB, "
        f"val {splits['val']['docs']} docs / {splits['val']['bytes'] / MIB:.1f} MiB; "
        f"{manifest['duplicates_removed']} duplicates removed, {manifest['empty_dropped']} empty dropped, "
        f"{manifest['undecodable']['bytes']} undecodable bytes replaced in {manifest['undecodable']['docs']} docs, "
        f"{skipped_summary(manifest['skipped'])}"
    )


commands = [corpus]
