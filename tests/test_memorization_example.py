"""examples/memorization.toml, scaled down: the same two models (a corpus and a quarter of it,
the same steps) on the tiny token folder with a small model, and the verdicts it is about."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from shipkit.cli import main
from shipkit.evidence import read_evidence
from shipkit.ship import load_ship_config
from shipkit.train import train
from shipkit.train.presets import apply_overrides, get_preset

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "memorization.toml"
# The tiny token folder has ~280k train tokens; at 256 tokens a step the corpus (a tenth) is one
# pass in 120 steps and its quarter four. The model is small enough for ~10 s a run.
SCALE_DOWN = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "seq_len": 32, "batch_size": 8, "num_steps": 120,
              "steps_per_epoch": 15, "warmup_steps": 5, "lr": 5e-3, "val_tokens": 2048}


@pytest.fixture(scope="module")
def example_runs(tiny_tokens_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memorization")
    runs = {}
    for spec in load_ship_config(EXAMPLE).models:
        config = apply_overrides(get_preset(spec.preset), {**spec.overrides, **SCALE_DOWN})
        train(config, tiny_tokens_dir, root / spec.name / "run", device="cpu", progress=False)
        runs[spec.name] = root / spec.name / "run"
    return runs


def _summary(run_dir: Path) -> dict:
    return read_evidence(run_dir, "training-summary")["summary"]


def test_the_example_trains_the_same_preset_on_a_corpus_and_its_quarter() -> None:
    full, quarter = load_ship_config(EXAMPLE).models
    assert (full.name, quarter.name) == ("full", "quarter")
    assert full.preset == quarter.preset and full.corpus == quarter.corpus
    assert quarter.overrides["train_fraction"] == full.overrides["train_fraction"] / 4
    assert {**full.overrides, "train_fraction": 0} == {**quarter.overrides, "train_fraction": 0}
    assert load_ship_config(EXAMPLE).allow_failed_gates


def test_the_quarter_repeats_its_text_four_times_as_often(example_runs: dict[str, Path]) -> None:
    full, quarter = (read_evidence(example_runs[name], "training-summary")["epochs"] for name in ("full", "quarter"))
    assert [epoch["step"] for epoch in full] == [epoch["step"] for epoch in quarter]
    assert quarter[-1]["wraps"] == pytest.approx(4 * full[-1]["wraps"], rel=0.05)


def test_the_quarter_overfits_and_the_full_corpus_does_not(example_runs: dict[str, Path]) -> None:
    full, quarter = (_summary(example_runs[name])["memorization"] for name in ("full", "quarter"))
    assert (quarter["verdict"], quarter["rule"]) == ("overfitting", "gap-grew")
    assert quarter["gap_growth"] > quarter["overfitting_gap_growth"] > full["gap_growth"]
    assert full["verdict"] not in ("overfitting", "memorization-suspect")
    assert quarter["turn_epoch"] is not None and full["turn_epoch"] is None


def test_compare_shows_both_verdicts_and_plots_both_runs(example_runs: dict[str, Path], tmp_path: Path) -> None:
    plot = tmp_path / "loss.png"
    args = ["compare", str(example_runs["full"]), str(example_runs["quarter"]), "--plot", str(plot)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == ["full/run", "quarter/run"]
    assert any(line.startswith("quarter/run: overfitting (turned at epoch") for line in result.output.splitlines())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
