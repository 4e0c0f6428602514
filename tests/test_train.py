"""`shipkit train`: run folder, checkpoints, evidence, stop reasons, resume and DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer

from shipkit.apr import read_apr, validate_apr
from shipkit.cli import main
from shipkit.data import Windows
from shipkit.errors import InputError, TrainingError
from shipkit.evidence import read_evidence
from shipkit.fsutil import sha256_file
from shipkit.model import CausalLM
from shipkit.presets import apply_overrides, get_preset
from shipkit.tokenize import read_tokens
from shipkit.train import train

REPO_ROOT = Path(__file__).resolve().parents[1]

# A model small enough that a few steps take milliseconds.
MICRO = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "seq_len": 16,
    "batch_size": 2,
    "num_steps": 4,
    "steps_per_epoch": 2,
    "warmup_steps": 1,
    "val_tokens": 64,
}


def _micro_config(**changes: object):
    return apply_overrides(get_preset("tiny"), {**MICRO, **changes})


def _set_options(overrides: dict[str, object]) -> list[str]:
    return [option for key, value in overrides.items() for option in ("--set", f"{key}={value}")]


def _shipkit_process(*args: str, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "shipkit", *args], env=env, **popen)


# --- the shared tiny run ------------------------------------------------------------------------


def test_run_dir_holds_epoch_checkpoints_best_tokenizer_and_evidence(tiny_run_dir: Path) -> None:
    ckpt = tiny_run_dir / "ckpt"
    for epoch in (1, 2, 3):
        assert (ckpt / f"epoch-{epoch:03d}.apr").is_file()
        assert (ckpt / f"epoch-{epoch:03d}.metadata.json").is_file()
    assert (ckpt / "best.apr").is_file()
    assert (tiny_run_dir / "tokenizer.json").is_file()
    assert (tiny_run_dir / "evidence" / "training-summary.json").is_file()


def test_only_the_latest_resume_companion_is_kept(tiny_run_dir: Path) -> None:
    assert sorted(p.name for p in (tiny_run_dir / "ckpt").glob("*.resume.apr")) == ["epoch-003.resume.apr"]


def test_tokenizer_is_copied_byte_for_byte(tiny_run_dir: Path, tiny_tokens_dir: Path) -> None:
    assert sha256_file(tiny_run_dir / "tokenizer.json") == sha256_file(tiny_tokens_dir / "tokenizer.json")


def test_epoch_checkpoint_is_valid_weights_apr_with_pipeline_metadata(tiny_run_dir: Path) -> None:
    path = tiny_run_dir / "ckpt" / "epoch-002.apr"
    assert validate_apr(path).ok
    checkpoint = read_apr(path)
    evidence = read_evidence(tiny_run_dir, "training-summary")
    assert checkpoint.metadata["kind"] == "weights"
    assert checkpoint.metadata["config"] == evidence["model"]
    assert checkpoint.metadata["tokenizer"] == {
        "file": "tokenizer.json",
        "sha256": sha256_file(tiny_run_dir / "tokenizer.json"),
    }
    assert checkpoint.metadata["producer"]["run_id"] == evidence["run_id"]
    assert checkpoint.metadata["producer"]["epoch"] == 2
    assert len(checkpoint.tensors) == checkpoint.config.expected_tensor_count()


def test_epoch_checkpoint_loads_into_the_model(tiny_run_dir: Path) -> None:
    checkpoint = read_apr(tiny_run_dir / "ckpt" / "epoch-003.apr")
    model = CausalLM(checkpoint.config)
    model.load_weights({name: tensor.clone() for name, tensor in checkpoint.tensors.items()})
    logits = model(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 4, checkpoint.config.vocab_size)


def test_vocab_size_comes_from_the_tokenizer_not_the_preset(tiny_run_dir: Path, tiny_tokens_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_tokens_dir / "tokenizer.json"))
    evidence = read_evidence(tiny_run_dir, "training-summary")
    assert evidence["model"]["vocab_size"] == tokenizer.get_vocab_size(with_added_tokens=True)
    assert evidence["model"]["vocab_size"] != get_preset("tiny").model.vocab_size


def test_evidence_records_one_entry_per_epoch_with_cumulative_counters(tiny_run_dir: Path) -> None:
    evidence = read_evidence(tiny_run_dir, "training-summary")
    hyper = evidence["hyperparameters"]
    epochs = evidence["epochs"]
    assert [epoch["epoch"] for epoch in epochs] == [1, 2, 3]
    assert [epoch["step"] for epoch in epochs] == [8, 16, 24]
    tokens_per_step = hyper["batch_size"] * hyper["seq_len"]
    assert [epoch["tokens_seen"] for epoch in epochs] == [8 * tokens_per_step, 16 * tokens_per_step, 24 * tokens_per_step]
    assert epochs[0]["wraps"] < epochs[1]["wraps"] < epochs[2]["wraps"]
    assert all(epoch["gap"] == epoch["val_loss"] - epoch["train_loss"] for epoch in epochs)
    assert all(epoch["mfu"] is None for epoch in epochs)


def test_val_loss_falls_over_the_tiny_run(tiny_run_dir: Path) -> None:
    epochs = read_evidence(tiny_run_dir, "training-summary")["epochs"]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]


def test_best_checkpoint_is_the_lowest_val_epoch_and_its_checksum_is_recorded(tiny_run_dir: Path) -> None:
    evidence = read_evidence(tiny_run_dir, "training-summary")
    summary = evidence["summary"]
    lowest = min(evidence["epochs"], key=lambda epoch: epoch["val_loss"])
    best = summary["best_checkpoint"]
    assert summary["best_epoch"] == lowest["epoch"] == best["epoch"]
    assert summary["best_val_loss"] == lowest["val_loss"]
    assert best["sha256"] == sha256_file(tiny_run_dir / best["path"])
    assert best["sha256"] == sha256_file(tiny_run_dir / lowest["checkpoint"])
    assert best["tensor_count"] == len(read_apr(tiny_run_dir / best["path"]).tensors)


def test_completed_run_summary_says_completed(tiny_run_dir: Path) -> None:
    summary = read_evidence(tiny_run_dir, "training-summary")["summary"]
    assert (summary["status"], summary["stop_reason"], summary["steps_completed"]) == ("completed", "completed", 24)


def test_epoch_metadata_json_repeats_the_epoch_record(tiny_run_dir: Path) -> None:
    evidence = read_evidence(tiny_run_dir, "training-summary")
    metadata = json.loads((tiny_run_dir / "ckpt" / "epoch-001.metadata.json").read_text())
    assert metadata["val_loss"] == evidence["epochs"][0]["val_loss"]
    assert metadata["sha256"] == sha256_file(tiny_run_dir / "ckpt" / "epoch-001.apr")


# --- stop reasons -------------------------------------------------------------------------------


def test_non_finite_loss_stops_the_run_and_the_evidence_says_why(tiny_tokens_dir: Path, tmp_path: Path) -> None:
    config = _micro_config(lr=1e4)
    with pytest.raises(TrainingError, match="training loss became nan"):
        train(config, tiny_tokens_dir, tmp_path / "run", device="cpu", progress=False)
    summary = read_evidence(tmp_path / "run", "training-summary")["summary"]
    assert (summary["status"], summary["stop_reason"]) == ("stopped", "non-finite-loss")
    assert summary["convergence"] == "diverged"
    assert "nan" in summary["stop_message"]


def test_split_too_short_for_a_window_stops_with_empty_stream(tiny_tokens_dir: Path, tmp_path: Path) -> None:
    huge = 1 << 24
    config = _micro_config(seq_len=huge, max_position_embeddings=huge)
    with pytest.raises(TrainingError, match="fewer than one window"):
        train(config, tiny_tokens_dir, tmp_path / "run", device="cpu", progress=False)
    summary = read_evidence(tmp_path / "run", "training-summary")["summary"]
    assert (summary["stop_reason"], summary["epochs_completed"]) == ("empty-stream", 0)


def test_out_dir_that_already_holds_a_run_is_refused(tiny_run_dir: Path, tiny_tokens_dir: Path) -> None:
    with pytest.raises(InputError, match="already holds a run"):
        train(_micro_config(), tiny_tokens_dir, tiny_run_dir, device="cpu", progress=False)


def test_data_dir_without_tokenizer_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no tokenizer.json"):
        train(_micro_config(), tmp_path, tmp_path / "run", device="cpu", progress=False)


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_train_prints_summary_and_exits_0(tiny_tokens_dir: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(tiny_tokens_dir), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(main, [*args, *_set_options(MICRO), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["summary"]["epochs_completed"] == 2


def test_cli_unknown_set_field_exits_2(tiny_tokens_dir: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(tiny_tokens_dir), "--out", str(tmp_path / "run"), "--set", "hiden_size=3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "hiden_size: unknown field" in result.output


def test_cli_resume_refuses_a_finished_run_without_more_steps(tiny_run_dir: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--resume", str(tiny_run_dir), "--device", "cpu"])
    assert result.exit_code == 2
    assert "already reached num_steps 24" in result.output


# --- resume and DDP (real processes) ------------------------------------------------------------

RESUME_RUN = {**MICRO, "num_steps": 60, "steps_per_epoch": 4, "val_tokens": 256}


def _train_args(tokens_dir: Path, run_dir: Path) -> list[str]:
    return ["train", "--data", str(tokens_dir), "--out", str(run_dir), "--device", "cpu", "--quiet", *_set_options(RESUME_RUN)]


def _kill_after_first_epoch(process: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 120
    while not list((run_dir / "ckpt").glob("epoch-*.resume.apr")):
        assert process.poll() is None, "training exited before its first epoch"
        assert time.monotonic() < deadline, "no epoch checkpoint within 120 s"
        time.sleep(0.01)
    assert process.poll() is None, "training finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_resume_after_kill_reproduces_uninterrupted_losses_bit_for_bit(tiny_tokens_dir: Path, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = _shipkit_process(*_train_args(tiny_tokens_dir, straight), stdout=subprocess.DEVNULL)
    interrupted = _shipkit_process(*_train_args(tiny_tokens_dir, killed), stdout=subprocess.DEVNULL)
    _kill_after_first_epoch(interrupted, killed)
    assert uninterrupted.wait() == 0
    saved_before_kill = len(list((killed / "ckpt").glob("epoch-*.metadata.json")))
    assert saved_before_kill < RESUME_RUN["num_steps"] // RESUME_RUN["steps_per_epoch"]

    resumed = _shipkit_process("train", "--resume", str(killed), "--device", "cpu", "--quiet", stdout=subprocess.DEVNULL)
    assert resumed.wait() == 0

    fields = ("train_loss", "val_loss", "grad_norm_max", "lr", "wraps", "tokens_seen", "step")
    expected = read_evidence(straight, "training-summary")
    got = read_evidence(killed, "training-summary")
    assert [[epoch[key] for key in fields] for epoch in got["epochs"]] == [
        [epoch[key] for key in fields] for epoch in expected["epochs"]
    ]
    last = f"ckpt/epoch-{len(expected['epochs']):03d}.apr"
    final_expected, final_got = read_apr(straight / last).tensors, read_apr(killed / last).tensors
    assert all(torch.equal(final_got[name], tensor) for name, tensor in final_expected.items())


@pytest.mark.slow
def test_torchrun_ddp_with_gloo_trains_two_ranks_on_their_own_slices(tiny_tokens_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "shipkit", "train", "--data", str(tiny_tokens_dir), "--out", str(run_dir),
        "--device", "cpu", "--quiet", *_set_options(MICRO),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    evidence = read_evidence(run_dir, "training-summary")
    assert evidence["device"]["world_size"] == 2
    tokens_per_step = MICRO["batch_size"] * MICRO["seq_len"] * 2
    assert [epoch["tokens_seen"] for epoch in evidence["epochs"]] == [2 * tokens_per_step, 4 * tokens_per_step]
    assert evidence["summary"]["status"] == "completed"
    windows = Windows(read_tokens(tiny_tokens_dir, "train").shards, MICRO["seq_len"]).count
    assert evidence["epochs"][-1]["wraps"] == round(4 * MICRO["batch_size"] * 2 / windows, 6)
