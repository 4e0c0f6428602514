"""The leakage audit: exact duplicate documents and shared n-token windows across the split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from shipkit.audit import AuditConfig, audit_tokens, window_hashes
from shipkit.cli import main
from shipkit.corpus import CorpusConfig, build_corpus
from shipkit.tokenize import (
    MANIFEST_FORMAT,
    ShardWriter,
    TokenizerConfig,
    encode_corpus,
    train_tokenizer,
)

EOT = 0


def _tokens_dir(root: Path, train_docs: list[np.ndarray], val_docs: list[np.ndarray]) -> Path:
    """A token folder written through ShardWriter, one shard per split."""
    splits = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        writer = ShardWriter(root / f"{split}-00000.tok", np.dtype("<u2"))
        for doc in docs:
            writer.write_docs(np.concatenate([[EOT], doc]).astype(np.uint16), 1)
        info = writer.close()
        splits[split] = {"tokens": info.tokens, "docs": info.docs, "shards": [info.to_dict()]}
    manifest = {"format": MANIFEST_FORMAT, "eot_id": EOT, "vocab_size": 1000,
                "tokenizer": {"file": "tokenizer.json", "sha256": "0" * 64}, "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _brute_force_overlap(train_docs: list[np.ndarray], val_docs: list[np.ndarray], window: int) -> tuple[int, int]:
    def windows(doc: np.ndarray) -> list[tuple[int, ...]]:
        return [tuple(doc[i : i + window]) for i in range(len(doc) - window + 1)]

    train = {w for doc in train_docs for w in windows(doc)}
    val = [w for doc in val_docs for w in windows(doc)]
    return sum(w in train for w in val), len(val)


def _random_docs(rng: np.random.Generator, count: int, length: int) -> list[np.ndarray]:
    return [rng.integers(1, 50, size=int(rng.integers(length // 2, length))) for _ in range(count)]


def test_window_hashes_skip_windows_that_cross_a_document_boundary() -> None:
    tokens = np.concatenate([[EOT], np.arange(1, 11), [EOT], np.arange(11, 21)])
    assert len(window_hashes(tokens, 4, EOT)) == 2 * (10 - 4 + 1)


def test_equal_windows_hash_equal_wherever_they_sit() -> None:
    doc = np.arange(1, 40)
    first = window_hashes(np.concatenate([[EOT], doc]), 8, EOT)
    second = window_hashes(np.concatenate([[EOT, 7, 7, 7], doc]), 8, EOT)
    assert np.array_equal(first, second[3:])
    assert len(np.unique(first)) == len(first)


def test_window_overlap_matches_a_brute_force_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = _random_docs(rng, 20, 200)
    val = _random_docs(rng, 5, 200) + [train[3][10:120], np.concatenate([train[7][:60], [9] * 30])]
    report = audit_tokens(_tokens_dir(tmp_path, train, val), AuditConfig(window=16), tmp_path / "audit.json")
    hits, total = _brute_force_overlap(train, val, 16)
    assert (report["val_windows_in_train"], report["val_windows"]) == (hits, total)
    assert hits > 0 and report["sample_rate"] == 1.0


def test_chunking_neither_loses_nor_doubles_windows(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train, val = _random_docs(rng, 10, 300), _random_docs(rng, 3, 300)
    val.append(train[0][:200])
    tokens_dir = _tokens_dir(tmp_path, train, val)
    whole = audit_tokens(tokens_dir, AuditConfig(window=8), tmp_path / "a.json")
    chunked = audit_tokens(tokens_dir, AuditConfig(window=8, chunk_tokens=37), tmp_path / "b.json")
    assert whole == chunked


def test_sampling_bounds_the_train_hashes_and_keeps_the_estimate(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    train = _random_docs(rng, 40, 1000)
    val = [doc[: len(doc) // 2] for doc in train[:10]] + _random_docs(rng, 10, 500)
    tokens_dir = _tokens_dir(tmp_path, train, val)
    exact = audit_tokens(tokens_dir, AuditConfig(window=8), tmp_path / "exact.json")
    sampled = audit_tokens(tokens_dir, AuditConfig(window=8, max_train_windows=5000), tmp_path / "sampled.json")
    assert sampled["sample_rate"] < 0.5
    assert sampled["train_windows_distinct"] < exact["train_windows_distinct"] / 2
    assert sampled["val_windows_checked"] < exact["val_windows_checked"]
    assert sampled["window_overlap_fraction"] == pytest.approx(exact["window_overlap_fraction"], abs=0.1)


def test_audit_finds_a_val_document_copied_into_train(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    train, val = _random_docs(rng, 10, 100), _random_docs(rng, 4, 100)
    report = audit_tokens(_tokens_dir(tmp_path, [*train, val[2]], val), out=tmp_path / "audit.json")
    assert report["val_docs_in_train"] == 1
    assert report["exact_duplicate_fraction"] == 0.25


def test_audit_of_a_built_corpus_finds_no_duplicates(tmp_path: Path, tiny_tokens_dir: Path) -> None:
    report = audit_tokens(tiny_tokens_dir, out=tmp_path / "audit.json")
    assert report["val_docs"] > 0
    assert report["val_docs_in_train"] == 0
    assert json.loads((tmp_path / "audit.json").read_text()) == report


def test_audit_cli_exits_1_on_a_leaky_corpus(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": f"leak_{i} = {i}\n" * 5}) + "\n" for i in range(40)))
    corpus_dir, tokens_dir = tmp_path / "corpus", tmp_path / "tokens"
    corpus = build_corpus([source], corpus_dir, CorpusConfig(val_fraction=0.2))
    val_line = (corpus_dir / "val-00000.jsonl").read_text().splitlines()[0]
    with open(corpus_dir / "train-00000.jsonl", "a") as train_shard:  # hand-made leak
        train_shard.write(val_line + "\n")
    corpus["splits"]["train"]["shards"][0]["docs"] += 1
    (corpus_dir / "corpus.json").write_text(json.dumps(corpus))
    train_tokenizer(corpus_dir, tokens_dir, TokenizerConfig(vocab_size=300))
    encode_corpus(corpus_dir, tokens_dir)
    result = CliRunner().invoke(main, ["audit", str(tokens_dir), "--window", "8"])
    assert result.exit_code == 1
    assert "val docs with an exact duplicate in train: 1/" in result.output
    assert json.loads((tokens_dir / "audit.json").read_text())["val_docs_in_train"] == 1
