"""`shipkit train`: run folder, checkpoints, evidence, stop reasons, resume and DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer

from shipkit.apr import read_apr, validate_apr
from shipkit.cli import main
from shipkit.errors import InputError, IntegrityError, TrainingError
from shipkit.evidence import read_evidence, write_evidence
from shipkit.fsutil import sha256_file
from shipkit.model import CausalLM
from shipkit.tokenize import read_tokens
from shipkit.train import resume, train
from shipkit.train.data import Windows, train_subset
from shipkit.train.presets import apply_overrides, get_preset

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


def test_evidence_holds_the_training_verdict_with_its_rule_and_numbers(tiny_run_dir: Path) -> None:
    summary = read_evidence(tiny_run_dir, "training-summary")["summary"]
    verdict = summary["memorization"]
    assert verdict["verdict"] in ("healthy", "too-early", "split-shift", "overfitting", "memorization-suspect")
    assert {"rule", "reason", "epoch", "gap", "wraps", "train_lag", "first_pass_epoch", "first_pass_gap", "gap_growth",
            "best_epoch", "turn_epoch", "threshold", "overfitting_gap_growth", "overfitting_rise_epochs"} <= set(verdict)
    assert (verdict["epoch"], verdict["best_epoch"]) == (3, summary["best_epoch"])


def test_evidence_schema_refuses_an_unknown_verdict_and_reads_files_written_before_it(
        tiny_run_dir: Path, tmp_path: Path) -> None:
    evidence = read_evidence(tiny_run_dir, "training-summary")
    evidence["summary"]["memorization"]["verdict"] = "fine"
    with pytest.raises(IntegrityError, match="summary/memorization/verdict"):
        write_evidence(tmp_path, "training-summary", evidence)
    evidence["summary"].pop("early_stop")
    evidence["summary"]["memorization"] = {"verdict": "inconclusive", "gap": 0.21, "wraps": 0.1, "threshold": 0.1,
                                           "reason": "val above train by more than the threshold"}
    write_evidence(tmp_path, "training-summary", evidence)
    assert read_evidence(tmp_path, "training-summary")["summary"]["memorization"]["verdict"] == "inconclusive"


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


# --- early stopping and train_fraction -----------------------------------------------------------

# A model that learns 2% of the tiny corpus by heart within a few epochs: val is best after
# epoch 1 and rises from there while train keeps falling.
OVERFIT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1, "seq_len": 32, "batch_size": 8, "num_steps": 300, "steps_per_epoch": 30,
           "warmup_steps": 5, "lr": 1e-2, "val_tokens": 1024, "train_fraction": 0.02}


@pytest.fixture(scope="module")
def early_stopped_run_dir(tiny_tokens_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("early-stop") / "run"
    config = apply_overrides(get_preset("tiny"), {**OVERFIT, "early_stop_patience": 2})
    train(config, tiny_tokens_dir, run_dir, device="cpu", progress=False)
    return run_dir


def test_early_stop_ends_the_run_after_patience_epochs_without_a_new_best(early_stopped_run_dir: Path) -> None:
    summary = read_evidence(early_stopped_run_dir, "training-summary")["summary"]
    assert (summary["status"], summary["stop_reason"]) == ("completed", "early_stop")
    assert (summary["best_epoch"], summary["epochs_completed"], summary["steps_completed"]) == (1, 3, 90)
    assert summary["early_stop"] == {"patience": 2, "epochs_without_improvement": 2, "stopped_after_epoch": 3}
    assert "no new best val loss in 2 epoch(s)" in summary["stop_message"]
    assert not (early_stopped_run_dir / "ckpt" / "epoch-004.apr").exists()


def test_an_early_stopped_run_is_labelled_overfitting_with_its_best_epoch(early_stopped_run_dir: Path) -> None:
    verdict = read_evidence(early_stopped_run_dir, "training-summary")["summary"]["memorization"]
    assert (verdict["verdict"], verdict["best_epoch"]) == ("overfitting", 1)
    assert verdict["turn_epoch"] > verdict["best_epoch"]


def test_resuming_an_early_stopped_run_leaves_it_stopped(early_stopped_run_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(early_stopped_run_dir, run_dir)
    evidence = resume(run_dir, num_steps=600, device="cpu", progress=False)
    assert (evidence["summary"]["stop_reason"], evidence["summary"]["epochs_completed"]) == ("early_stop", 3)
    assert sorted(path.name for path in (run_dir / "ckpt").glob("epoch-*.apr")) == [
        "epoch-001.apr", "epoch-002.apr", "epoch-003.apr", "epoch-003.resume.apr"]


def test_resume_counts_patience_from_the_recorded_epochs(tiny_tokens_dir: Path, tmp_path: Path) -> None:
    config = apply_overrides(get_preset("tiny"), {**OVERFIT, "num_steps": 60, "early_stop_patience": 3})
    train(config, tiny_tokens_dir, tmp_path / "run", device="cpu", progress=False)
    first = read_evidence(tmp_path / "run", "training-summary")["summary"]
    assert first["stop_reason"] == "completed"
    evidence = resume(tmp_path / "run", num_steps=300, device="cpu", progress=False)
    # Whether epoch 2 beat epoch 1 depends on the CPU's float rounding, so the expected stop is
    # derived from the recorded losses: the first epoch that ends 3 epochs without a new best,
    # counting across the resume from epoch 1.
    best, without, expected_stop = float("inf"), 0, None
    for number, record in enumerate(evidence["epochs"], start=1):
        best, without = (record["val_loss"], 0) if record["val_loss"] < best else (best, without + 1)
        if without == 3:
            expected_stop = number
            break
    assert expected_stop is not None
    summary = evidence["summary"]
    assert (summary["stop_reason"], summary["early_stop"]["stopped_after_epoch"]) == ("early_stop", expected_stop)


def test_no_patience_records_no_early_stop(tiny_run_dir: Path) -> None:
    assert read_evidence(tiny_run_dir, "training-summary")["summary"]["early_stop"] is None


def test_train_fraction_trains_on_a_random_share_of_the_windows(tiny_tokens_dir: Path) -> None:
    shards = read_tokens(tiny_tokens_dir, "train").shards
    subset = train_subset(shards, 32, 0.25, seed=42)
    all_windows, kept = Windows(shards, 32).count, Windows(subset, 32).count
    assert kept == pytest.approx(all_windows / 4, rel=0.05)
    assert all(np.shares_memory(part, shards[0]) for part in subset)
    assert [part[0] for part in subset] == [part[0] for part in train_subset(shards, 32, 0.25, seed=42)]
    assert train_subset(shards, 32, 1.0, seed=42) == list(shards)


def test_train_fraction_multiplies_the_passes(early_stopped_run_dir: Path, tiny_tokens_dir: Path) -> None:
    epochs = read_evidence(early_stopped_run_dir, "training-summary")["epochs"]
    windows = Windows(read_tokens(tiny_tokens_dir, "train").shards, OVERFIT["seq_len"]).count
    consumed = OVERFIT["steps_per_epoch"] * OVERFIT["batch_size"]
    assert epochs[0]["wraps"] == pytest.approx(consumed / (windows * OVERFIT["train_fraction"]), rel=0.05)


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


def test_cli_early_stop_patience_option_sets_the_config_field(tiny_tokens_dir: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(tiny_tokens_dir), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet",
            *_set_options(MICRO), "--early-stop-patience", "3", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    evidence = json.loads(result.output)
    assert evidence["hyperparameters"]["early_stop_patience"] == 3
    assert evidence["summary"]["early_stop"]["patience"] == 3


def test_cli_prints_the_early_stop_and_the_verdict(early_stopped_run_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(early_stopped_run_dir, tmp_path / "run")
    result = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "run"), "--num-steps", "600",
                                       "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "3 epochs, 90 steps, early_stop" in result.output
    assert "verdict: overfitting, turned at epoch" in result.output


def test_cli_early_stop_patience_is_refused_on_resume(tiny_run_dir: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--resume", str(tiny_run_dir), "--early-stop-patience", "2"])
    assert result.exit_code == 2
    assert "early_stop_patience" in result.output


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
