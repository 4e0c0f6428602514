"""`shipkit compare`: runs side by side with their verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_train import MICRO

from shipkit.cli import main
from shipkit.evidence import read_evidence
from shipkit.train import train
from shipkit.train.compare import compare_runs, run_labels
from shipkit.train.presets import apply_overrides, get_preset

SHORT_RUN = {**MICRO, "num_steps": 2, "steps_per_epoch": 1}


@pytest.fixture(scope="module")
def short_run_dir(tiny_tokens_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("compare") / "short"
    train(apply_overrides(get_preset("tiny"), SHORT_RUN), tiny_tokens_dir, run_dir, device="cpu", progress=False)
    return run_dir


def test_compare_returns_each_runs_epochs_and_verdicts(tiny_run_dir: Path, short_run_dir: Path) -> None:
    comparison = compare_runs([tiny_run_dir, short_run_dir])
    tiny, short = comparison.runs
    assert (len(tiny["epochs"]), len(short["epochs"])) == (3, 2)
    evidence = read_evidence(tiny_run_dir, "training-summary")
    assert tiny["epochs"][2]["val_loss"] == evidence["epochs"][2]["val_loss"]
    assert tiny["memorization"] == evidence["summary"]["memorization"]
    assert set(tiny["epochs"][0]) == {"epoch", "train_loss", "val_loss", "gap", "wraps"}


def test_compare_table_has_a_row_per_epoch_and_a_verdict_line_per_run(tiny_run_dir: Path, short_run_dir: Path) -> None:
    result = CliRunner().invoke(main, ["compare", str(tiny_run_dir), str(short_run_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["epoch", *["train", "val", "gap", "wraps"] * 2]
    assert [line.split()[0] for line in lines[2:5]] == ["1", "2", "3"]
    assert len(lines[4].split()) == 1 + 4  # the short run has no third epoch
    verdict_lines = [line for line in lines if line.startswith(("run:", "short:"))]
    assert len(verdict_lines) == 2
    tiny_verdict = read_evidence(tiny_run_dir, "training-summary")["summary"]["memorization"]["verdict"]
    assert verdict_lines[0].startswith(f"run: {tiny_verdict}")


def test_compare_json_is_machine_readable(tiny_run_dir: Path, short_run_dir: Path) -> None:
    result = CliRunner().invoke(main, ["compare", str(tiny_run_dir), str(short_run_dir), "--json"])
    assert [run["run_dir"] for run in json.loads(result.output)["runs"]] == [str(tiny_run_dir), str(short_run_dir)]


def test_compare_of_a_folder_without_evidence_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["compare", str(tmp_path)])
    assert result.exit_code == 2
    assert "evidence file not found" in result.output


def test_compare_labels_runs_by_as_much_of_their_path_as_tells_them_apart(tmp_path: Path) -> None:
    assert run_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
    assert run_labels([tmp_path / "full" / "run", tmp_path / "quarter" / "run"]) == ["full/run", "quarter/run"]


def test_compare_plot_is_one_png_with_a_panel_per_run(tiny_run_dir: Path, short_run_dir: Path, tmp_path: Path) -> None:
    plot = tmp_path / "plots" / "loss.png"
    result = CliRunner().invoke(main, ["compare", str(tiny_run_dir), str(short_run_dir), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"loss curves: {plot}"
    header = plot.read_bytes()
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(header[16:20], "big")
    assert width == 2 * 480  # two 4.8-inch panels at 100 dpi


def test_compare_json_names_the_plot(tiny_run_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["compare", str(tiny_run_dir), "--plot", str(tmp_path / "l.png"), "--json"])
    assert json.loads(result.output)["plot"] == str(tmp_path / "l.png")


def test_compare_plot_onto_a_folder_exits_2(tiny_run_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["compare", str(tiny_run_dir), "--plot", str(tmp_path)])
    assert result.exit_code == 2
    assert "is a folder" in result.output


def test_compare_verdict_line_states_the_verdict_and_its_reason(tiny_run_dir: Path) -> None:
    result = CliRunner().invoke(main, ["compare", str(tiny_run_dir)])
    verdict = read_evidence(tiny_run_dir, "training-summary")["summary"]["memorization"]
    assert f"run: {verdict['verdict']}" in result.output
    assert verdict["reason"] in result.output
