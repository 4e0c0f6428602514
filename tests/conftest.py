"""Session-wide fixtures shared by the stage tests. Append new fixtures; do not rewrite."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

# ~1.3 MB of real Python: enough text for a 2048-token BPE and a val split of a few documents.
TINY_CORPUS_PACKAGES = ("json", "email", "http", "asyncio", "logging")
TINY_VOCAB_SIZE = 2048
TINY_VAL_FRACTION = 0.1


@pytest.fixture(scope="session")
def tiny_tokens_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TOKENS_DIR (tokenizer.json, train/val .tok shards, manifest.json) built from a few
    stdlib packages by the real corpus -> tokenize pipeline; its CORPUS_DIR is `../corpus`."""
    from shipkit.corpus import CorpusConfig, build_corpus
    from shipkit.tokenize import TokenizerConfig, encode_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("tiny-pipeline")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus_dir, tokens_dir = root / "corpus", root / "tokens"
    build_corpus([stdlib / name for name in TINY_CORPUS_PACKAGES], corpus_dir,
                 CorpusConfig(val_fraction=TINY_VAL_FRACTION))
    train_tokenizer(corpus_dir, tokens_dir, TokenizerConfig(vocab_size=TINY_VOCAB_SIZE))
    encode_corpus(corpus_dir, tokens_dir)
    return tokens_dir


# A 2-layer model whose matrix rows are multiples of 256 (what GGUF k-quants need).
TINY_RUN_OVERRIDES = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "seq_len": 64,
    "batch_size": 8,
    "num_steps": 24,
    "steps_per_epoch": 8,
    "warmup_steps": 4,
    "lr": 3e-3,
    "val_tokens": 2048,
}


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_tokens_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-epoch `shipkit train` RUN_DIR on `tiny_tokens_dir` (CPU, ~10 s on an idle
    2-core machine): tokenizer.json, ckpt/epoch-00{1,2,3}.apr (+ .metadata.json),
    ckpt/epoch-003.resume.apr, ckpt/best.apr and evidence/training-summary.json.
    Shared by the session: copy it before writing into it."""
    from shipkit.train import train
    from shipkit.train.presets import apply_overrides, get_preset

    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    config = apply_overrides(get_preset("tiny"), TINY_RUN_OVERRIDES)
    train(config, tiny_tokens_dir, run_dir, device="cpu", progress=False)
    return run_dir


def pytest_terminal_summary(terminalreporter) -> None:
    """The hostile-input tally (tests/hostile.py), for docs/reliability.md."""
    from hostile import TALLY

    if TALLY:
        counts = ", ".join(f"{suite} {count}" for suite, count in sorted(TALLY.items()))
        terminalreporter.write_line(f"hostile inputs refused cleanly: {sum(TALLY.values())} ({counts})")
