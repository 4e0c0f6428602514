"""The run folder's layout (`shipkit.layout.RunDir`) and the one tokenizer finder every stage uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import run_cli
from release_helpers import write_tiny_checkpoint, write_tokenizer

from shipkit.apr import inspect_apr
from shipkit.evidence import TRAINING_EVIDENCE, read_evidence
from shipkit.export import export_hf
from shipkit.layout import TOKENIZER_FILE, RunDir, find_tokenizer
from shipkit.quantize import write_gguf
from shipkit.quantize.gguf_load import open_gguf

OTHER_EOT = "<|eot|>"  # the second tokenizer's name for token 0 (the first's is <|endoftext|>)


def test_a_trained_run_holds_the_files_run_dir_names(tiny_run_dir: Path) -> None:
    run = RunDir(tiny_run_dir)
    epochs = read_evidence(tiny_run_dir, TRAINING_EVIDENCE)["epochs"]
    assert [record["checkpoint"] for record in epochs] == [RunDir.epoch_file(n) for n in (1, 2, 3)]
    for number in (1, 2, 3):
        assert run.epoch(number).is_file() and run.epoch_metadata(number).is_file()
    assert run.resume_epochs() == [3] and run.resume(3).is_file()
    assert run.best.is_file() and run.tokenizer.is_file() and run.lock.is_file()
    summary = read_evidence(tiny_run_dir, TRAINING_EVIDENCE)["summary"]
    assert summary["best_checkpoint"]["path"] == RunDir.BEST == run.relative(run.best)


def test_run_relative_names_are_the_text_evidence_and_gates_print(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    names = {RunDir.BEST: run.best, RunDir.TOKENIZER: run.tokenizer, RunDir.LOCK: run.lock,
             RunDir.RELEASE_HF: run.release_hf, RunDir.RELEASE_GGUF: run.release_gguf,
             RunDir.CARD: run.card, RunDir.GGUF_CARD: run.gguf_card, RunDir.LOSS_PLOT: run.loss_plot,
             RunDir.evidence_file("parity"): run.evidence("parity"), RunDir.epoch_file(12): run.epoch(12)}
    assert {name: run.relative(path) for name, path in names.items()} == {name: name for name in names}
    assert sorted(names) == sorted([
        "ckpt/best.apr", "tokenizer.json", ".train.lock", "release/hf", "release/gguf", "release/card/README.md",
        "release/card/gguf/README.md", "release/card/loss.png", "evidence/parity.json", "ckpt/epoch-012.apr"])


def test_resume_epochs_reads_only_resume_file_names(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.ckpt.mkdir()
    for name in ("epoch-010.resume.apr", "epoch-002.resume.apr", "epoch-003.apr", "epoch-x.resume.apr",
                 "epoch-004.resume.apr.tmp", "notes.txt"):
        (run.ckpt / name).touch()
    assert run.resume_epochs() == [2, 10]
    assert RunDir(tmp_path / "missing").resume_epochs() == []


@pytest.fixture
def two_tokenizers(tmp_path: Path) -> RunDir:
    """An imported checkpoint with its tokenizer beside it (RUN_DIR/ckpt/tokenizer.json) and
    another tokenizer.json one folder up: export's old finder read the first, quantize's the
    second."""
    run = RunDir(tmp_path / "run")
    beside = run.ckpt / TOKENIZER_FILE
    write_tokenizer(beside)
    write_tiny_checkpoint(run.best, beside)
    run.tokenizer.write_text(beside.read_text().replace("<|endoftext|>", OTHER_EOT))
    return run


def test_export_and_quantize_read_the_same_tokenizer(two_tokenizers: RunDir, tmp_path: Path) -> None:
    run = two_tokenizers
    beside = run.ckpt / TOKENIZER_FILE
    assert find_tokenizer(run.best, inspect_apr(run.best).metadata) == beside

    export_hf(run.best, tmp_path / "hf")
    assert (tmp_path / "hf" / TOKENIZER_FILE).read_bytes() == beside.read_bytes()
    gguf = write_gguf(run.best, tmp_path / "model.gguf", "F32").path
    tokens = open_gguf(gguf).fields["tokenizer.ggml.tokens"].contents()
    assert tokens[0] == "<|endoftext|>" and OTHER_EOT not in tokens


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_a_tokenizer_other_than_the_recorded_one_is_refused_in_one_line(two_tokenizers: RunDir, tmp_path: Path,
                                                                       command: str) -> None:
    run = two_tokenizers
    (run.ckpt / TOKENIZER_FILE).unlink()  # left: the other tokenizer, one folder up
    out = tmp_path / "out"
    args = {"export": ("export", run.best, "--hf", out),
            "quantize": ("quantize", run.best, "--type", "F32", "--out", out)}[command]
    outcome = run_cli(*args)
    assert outcome.exit_code == 1
    assert _error_line(outcome.stderr).startswith(f"{run.tokenizer}: sha256 differs from the tokenizer recorded in")
    assert not out.exists()


def test_a_missing_tokenizer_names_both_places_looked(two_tokenizers: RunDir) -> None:
    run = two_tokenizers
    (run.ckpt / TOKENIZER_FILE).unlink()
    run.tokenizer.unlink()
    outcome = run_cli("quantize", run.best, "--type", "F32", "--out", run.root / "out")
    assert outcome.exit_code == 2
    assert f"no tokenizer found at {run.ckpt / TOKENIZER_FILE} or {run.tokenizer}" in _error_line(outcome.stderr)


def _error_line(stderr: str) -> str:
    """The CLI's error, which must be one line."""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    return stderr.removeprefix("error: ").strip()

