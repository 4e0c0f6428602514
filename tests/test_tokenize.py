"""Token shards, the memory-mapped reader, tokenizer training and encoding."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from shipkit.cli import main
from shipkit.corpus import CorpusConfig, build_corpus, is_val, iter_texts, text_sha256
from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import sha256_file
from shipkit.tokenize import (
    EOT_ID,
    EOT_TOKEN,
    EncodeConfig,
    ShardWriter,
    TokenizerConfig,
    encode_corpus,
    read_shard,
    read_tokens,
    token_dtype,
    train_tokenizer,
)


def _split_docs(tokens: np.ndarray, eot_id: int) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == eot_id)
    assert len(starts) and starts[0] == 0, "a shard starts with the EOT of its first document"
    return np.split(tokens, starts[1:])


def _jsonl_corpus(tmp_path: Path, texts: list[str], val_fraction: float = 0.3) -> Path:
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    corpus_dir = tmp_path / "corpus"
    build_corpus([source], corpus_dir, CorpusConfig(val_fraction=val_fraction))
    return corpus_dir


def _write_shard(path: Path, tokens: np.ndarray, docs: int = 1) -> None:
    writer = ShardWriter(path, tokens.dtype)
    writer.write_docs(tokens, docs)
    writer.close()


# --- the reader ---------------------------------------------------------------------------


def test_read_tokens_gives_back_every_corpus_document_eot_separated(tiny_tokens_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_tokens_dir / "tokenizer.json"))
    split = read_tokens(tiny_tokens_dir, "val")
    docs = [doc for shard in split.shards for doc in _split_docs(np.asarray(shard), split.eot_id)]
    decoded = [tokenizer.decode(doc[1:].tolist()) for doc in docs]
    assert decoded == list(iter_texts(tiny_tokens_dir.parent / "corpus", "val"))


def test_read_tokens_reports_totals_and_tokenizer_hash(tiny_tokens_dir: Path) -> None:
    split = read_tokens(tiny_tokens_dir, "train")
    manifest = json.loads((tiny_tokens_dir / "manifest.json").read_text())
    assert split.total_tokens == manifest["splits"]["train"]["tokens"] == sum(map(len, split.shards))
    assert split.eot_id == EOT_ID
    assert split.tokenizer_sha256 == sha256_file(tiny_tokens_dir / "tokenizer.json")


def test_read_tokens_memory_maps_uint16_shards(tiny_tokens_dir: Path) -> None:
    shard = read_tokens(tiny_tokens_dir, "train").shards[0]
    assert isinstance(shard, np.memmap)
    assert shard.dtype == np.uint16 and shard.ndim == 1


def test_token_dtype_widens_to_uint32_above_65536_ids() -> None:
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=200), st.sampled_from(["<u2", "<u4"]))
def test_shard_round_trips_tokens(tmp_path_factory: pytest.TempPathFactory, values: list[int], dtype: str) -> None:
    tokens = np.array(values, dtype=np.uint64).astype(dtype)
    path = tmp_path_factory.mktemp("shard") / "train-00000.tok"
    _write_shard(path, tokens)
    read = read_shard(path)
    assert read.dtype == np.dtype(dtype)
    assert np.array_equal(read, tokens)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [(0, b"NOTTOKEN", "bad magic"), (8, struct.pack("<I", 9), "version 9"),
     (12, struct.pack("<I", 3), "width 3"), (16, struct.pack("<Q", 11), "promises 11 tokens")],
)
def test_read_shard_names_the_file_with_a_bad_header(tmp_path: Path, offset: int, value: bytes, message: str) -> None:
    path = tmp_path / "train-00000.tok"
    _write_shard(path, np.arange(10, dtype=np.uint16))
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=message) as error:
        read_shard(path)
    assert str(path) in str(error.value)


def test_read_shard_rejects_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "val-00000.tok"
    _write_shard(path, np.arange(10, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(IntegrityError, match="val-00000.tok.*truncated"):
        read_shard(path)


def test_read_tokens_rejects_a_shard_that_disagrees_with_the_manifest(tmp_path: Path, tiny_tokens_dir: Path) -> None:
    tokens_dir = tmp_path / "tokens"
    manifest = json.loads((tiny_tokens_dir / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"] = [{"file": "val-00000.tok", "tokens": 5, "docs": 1, "sha256": ""}]
    tokens_dir.mkdir()
    (tokens_dir / "manifest.json").write_text(json.dumps(manifest))
    _write_shard(tokens_dir / "val-00000.tok", np.arange(4, dtype=np.uint16))
    with pytest.raises(IntegrityError, match="val-00000.tok: 4 tokens but manifest.json lists 5"):
        read_tokens(tokens_dir, "val")


def test_read_tokens_rejects_a_token_id_outside_the_vocabulary(tmp_path: Path, tiny_tokens_dir: Path) -> None:
    """An id the model has no row for must stop training before any step (CUDA kernels would
    not catch it)."""
    tokens_dir = tmp_path / "tokens"
    manifest = json.loads((tiny_tokens_dir / "manifest.json").read_text())
    vocab = manifest["vocab_size"]
    manifest["splits"]["val"]["shards"] = [{"file": "val-00000.tok", "tokens": 3, "docs": 1, "sha256": ""}]
    tokens_dir.mkdir()
    (tokens_dir / "manifest.json").write_text(json.dumps(manifest))
    _write_shard(tokens_dir / "val-00000.tok", np.array([1, vocab, 2], dtype=np.uint16))
    with pytest.raises(IntegrityError, match=f"val-00000.tok: token id {vocab} is outside the vocabulary of {vocab}"):
        read_tokens(tokens_dir, "val")


def test_read_tokens_without_manifest_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="tokenize encode"):
        read_tokens(tmp_path, "train")


# --- the tokenizer ------------------------------------------------------------------------


def test_tokenizer_has_end_of_text_at_id_zero(tiny_tokens_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_tokens_dir / "tokenizer.json"))
    assert tokenizer.token_to_id(EOT_TOKEN) == 0
    assert tokenizer.get_vocab_size() == 2048


def test_tokenizer_splits_with_the_gpt2_byte_level_regex(tiny_tokens_dir: Path) -> None:
    spec = json.loads((tiny_tokens_dir / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["type"] == "ByteLevel"
    assert spec["pre_tokenizer"]["use_regex"] is True
    assert spec["pre_tokenizer"]["add_prefix_space"] is False
    assert spec["normalizer"] is None


def test_tokenizer_loads_in_transformers_with_the_same_ids(tiny_tokens_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = str(tiny_tokens_dir / "tokenizer.json")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    text = "def spam(eggs):\n    return {'ham': eggs * 2}  # naïve ünïcode\n"
    ids = Tokenizer.from_file(path).encode(text).ids
    assert fast(text)["input_ids"] == ids
    assert fast.decode(ids) == text


def test_tokenizer_learns_nothing_from_the_val_split(tmp_path: Path) -> None:
    common = [f"def function_{i}(value):\n    return value + {i}\n" for i in range(60)]
    secret = next(f"zqxv{i} " * 300 for i in range(1000) if is_val(text_sha256(f"zqxv{i} " * 300), 0, 0.3))
    corpus_dir = _jsonl_corpus(tmp_path, [*common, secret])
    assert secret in iter_texts(corpus_dir, "val")
    train_tokenizer(corpus_dir, tmp_path / "tokens", TokenizerConfig(vocab_size=400))
    vocab = Tokenizer.from_file(str(tmp_path / "tokens" / "tokenizer.json")).get_vocab()
    assert not any("zq" in token or "qx" in token or "xv" in token for token in vocab)


def test_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    corpus_dir = _jsonl_corpus(tmp_path, [f"x_{i} = [{i}, {i * i}]\nprint(x_{i})\n" for i in range(80)])
    first = train_tokenizer(corpus_dir, tmp_path / "a", TokenizerConfig(vocab_size=300))
    second = train_tokenizer(corpus_dir, tmp_path / "b", TokenizerConfig(vocab_size=300))
    assert first.sha256 == second.sha256


def test_vocab_smaller_than_the_byte_alphabet_is_refused(tmp_path: Path) -> None:
    corpus_dir = _jsonl_corpus(tmp_path, [f"line {i}\n" for i in range(20)])
    with pytest.raises(InputError, match="at least 257"):
        train_tokenizer(corpus_dir, tmp_path / "tokens", TokenizerConfig(vocab_size=256))


# --- encoding -----------------------------------------------------------------------------


def test_literal_end_of_text_in_a_document_is_not_a_boundary(tmp_path: Path) -> None:
    texts = [f"doc {i}: the string '{EOT_TOKEN}' is data\n" for i in range(30)]
    corpus_dir = _jsonl_corpus(tmp_path, texts)
    train_tokenizer(corpus_dir, tmp_path / "tokens", TokenizerConfig(vocab_size=300))
    manifest = encode_corpus(corpus_dir, tmp_path / "tokens")
    for split in ("train", "val"):
        tokens = np.concatenate(read_tokens(tmp_path / "tokens", split).shards)
        assert int((tokens == EOT_ID).sum()) == manifest["splits"][split]["docs"]


def test_shards_are_capped_without_cutting_documents(tmp_path: Path, tiny_tokens_dir: Path) -> None:
    corpus_dir = tiny_tokens_dir.parent / "corpus"
    tokens_dir = tmp_path / "tokens"
    limit = 20_000
    manifest = encode_corpus(corpus_dir, tokens_dir, tiny_tokens_dir / "tokenizer.json",
                             EncodeConfig(shard_tokens=limit))
    shards = read_tokens(tokens_dir, "train").shards
    whole = read_tokens(tiny_tokens_dir, "train").shards
    assert len(shards) > 1
    for shard, info in zip(shards, manifest["splits"]["train"]["shards"], strict=True):
        assert shard[0] == EOT_ID
        assert len(shard) <= limit or info["docs"] == 1
        assert int((shard == EOT_ID).sum()) == info["docs"]
    assert np.array_equal(np.concatenate(shards), np.concatenate(whole))


def test_manifest_hashes_match_the_shard_files(tiny_tokens_dir: Path) -> None:
    manifest = json.loads((tiny_tokens_dir / "manifest.json").read_text())
    for split in ("train", "val"):
        for info in manifest["splits"][split]["shards"]:
            assert sha256_file(tiny_tokens_dir / info["file"]) == info["sha256"]
    assert manifest["tokenizer"]["sha256"] == sha256_file(tiny_tokens_dir / "tokenizer.json")


def test_re_encoding_removes_shards_from_an_earlier_run(tmp_path: Path, tiny_tokens_dir: Path) -> None:
    corpus_dir = tiny_tokens_dir.parent / "corpus"
    tokens_dir = tmp_path / "tokens"
    tokenizer = tiny_tokens_dir / "tokenizer.json"
    encode_corpus(corpus_dir, tokens_dir, tokenizer, EncodeConfig(shard_tokens=20_000))
    encode_corpus(corpus_dir, tokens_dir, tokenizer)
    assert sorted(path.name for path in tokens_dir.glob("*.tok")) == ["train-00000.tok", "val-00000.tok"]


def test_encode_cli_without_a_tokenizer_exits_2(tmp_path: Path, tiny_tokens_dir: Path) -> None:
    result = CliRunner().invoke(main, ["tokenize", "encode", str(tiny_tokens_dir.parent / "corpus"),
                                       "--out", str(tmp_path / "tokens")])
    assert result.exit_code == 2
    assert "tokenize train" in result.output


def test_cli_trains_and_encodes_a_token_folder(tmp_path: Path, tiny_tokens_dir: Path) -> None:
    corpus_dir, tokens_dir = str(tiny_tokens_dir.parent / "corpus"), str(tmp_path / "tokens")
    runner = CliRunner()
    trained = runner.invoke(main, ["tokenize", "train", corpus_dir, "--out", tokens_dir,
                                   "--vocab-size", "600", "--json"])
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.output)["vocab_size"] == 600
    encoded = runner.invoke(main, ["tokenize", "encode", corpus_dir, "--out", tokens_dir, "--json"])
    assert encoded.exit_code == 0, encoded.output
    assert read_tokens(tokens_dir, "val").total_tokens == json.loads(encoded.output)["splits"]["val"]["tokens"]
