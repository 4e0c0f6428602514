"""Falsifiable predictions: the `<field> <op> <number>` grammar, the verdicts, and `shipkit train
--predict` recording them before the first step and judging them when the run ends."""

import json

import pytest
from click.testing import CliRunner
from conftest import TINY_RUN_OVERRIDES
from hypothesis import given
from hypothesis import strategies as st

import shipkit.train.trainer
from shipkit.cli import main
from shipkit.errors import InputError
from shipkit.evidence import evidence_path, read_evidence
from shipkit.predict import (
    FIELDS,
    OPERATORS,
    Prediction,
    judge_predictions,
    parse_prediction,
    record_predictions,
)
from shipkit.train import train
from shipkit.train.presets import apply_overrides, get_preset

# Two epochs of two steps: enough for a best and a final val loss, in about a second.
SHORT_RUN = {**TINY_RUN_OVERRIDES, "num_steps": 4, "steps_per_epoch": 2}


def test_parse_reads_field_operator_and_number():
    assert parse_prediction("best_val_loss < 8.911") == Prediction("best_val_loss", "<", 8.911)
    assert parse_prediction("  best_epoch>=2 ") == Prediction("best_epoch", ">=", 2.0)
    assert parse_prediction("final_val_loss == -1.5e-3") == Prediction("final_val_loss", "==", -0.0015)


@given(st.sampled_from(FIELDS), st.sampled_from(sorted(OPERATORS)),
       st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12))
def test_expr_parses_back_to_the_same_prediction(field, op, value):
    prediction = Prediction(field, op, value)
    assert parse_prediction(prediction.expr) == prediction


@pytest.mark.parametrize("text", [
    "best_val_loss < 1; __import__('os')",
    "__import__('os').system('true') < 1",
    "best_val_loss < 1 and best_epoch > 0",
    "best_val_loss ~ 3",
    "best_val_loss < nan",
    "best_val_loss < inf",
    "best_val_loss <",
    "",
])
def test_parse_rejects_anything_but_one_comparison(text):
    with pytest.raises(InputError, match="expected `<field> <op> <number>`"):
        parse_prediction(text)


def test_parse_names_the_known_fields_for_an_unknown_one():
    with pytest.raises(InputError, match="unknown field 'val_loss' .*best_val_loss"):
        parse_prediction("val_loss < 3")


def test_parse_rejects_a_number_too_large_for_a_float():
    with pytest.raises(InputError, match="finite"):
        parse_prediction("best_val_loss < 1e400")


def test_record_parses_every_expression_before_recording_any():
    with pytest.raises(InputError):
        record_predictions(["best_val_loss < 9", "best_val_loss <"])


def test_judge_confirms_falsifies_or_leaves_undecided():
    recorded = record_predictions(["best_val_loss < 5", "best_epoch == 3", "final_val_loss > 1"])
    judged = judge_predictions(recorded, {"best_val_loss": 4.2, "best_epoch": 2, "final_val_loss": None})
    assert [(entry["observed"], entry["verdict"]) for entry in judged] == [
        (4.2, "CONFIRMED"), (2, "FALSIFIED"), (None, "UNDECIDED")]


def test_recorded_predictions_are_pending_with_a_utc_time():
    entry = record_predictions(["best_val_loss <= 7"])[0]
    assert entry["verdict"] == "PENDING" and entry["observed"] is None
    assert entry["recorded_at"].endswith("Z") and entry["expr"] == "best_val_loss <= 7"


@pytest.fixture(scope="module")
def predicted_run(tiny_tokens_dir, tmp_path_factory):
    """A short run with three predictions, and the training evidence as it stood when the first
    optimizer step began (read by a spy around the real train_step)."""
    run_dir = tmp_path_factory.mktemp("predicted") / "run"
    seen_before_first_step = []
    real_step = shipkit.train.trainer.train_step

    def step_after_reading_the_evidence(*args, **kwargs):
        if not seen_before_first_step:
            seen_before_first_step.append(json.loads(evidence_path(run_dir, "training-summary").read_text()))
        return real_step(*args, **kwargs)

    config = apply_overrides(get_preset("tiny"), SHORT_RUN)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shipkit.train.trainer, "train_step", step_after_reading_the_evidence)
        returned = train(config, tiny_tokens_dir, run_dir, device="cpu", progress=False,
                         predictions=["best_val_loss < 100", "final_val_loss > 100", "epochs_completed == 2"])
    return {"run_dir": run_dir, "returned": returned, "before_first_step": seen_before_first_step[0]}


def test_train_records_predictions_before_the_first_step(predicted_run):
    early = predicted_run["before_first_step"]
    assert early["epochs"] == [] and early["summary"]["status"] == "running"
    assert [(p["expr"], p["verdict"]) for p in early["predictions"]] == [
        ("best_val_loss < 100", "PENDING"), ("final_val_loss > 100", "PENDING"), ("epochs_completed == 2", "PENDING")]


def test_train_judges_each_prediction_against_its_own_summary(predicted_run):
    on_file = read_evidence(predicted_run["run_dir"], "training-summary")
    assert on_file["predictions"] == predicted_run["returned"]["predictions"]
    summary = on_file["summary"]
    assert [(p["observed"], p["verdict"]) for p in on_file["predictions"]] == [
        (summary["best_val_loss"], "CONFIRMED"), (summary["final_val_loss"], "FALSIFIED"), (2, "CONFIRMED")]


def test_judged_predictions_keep_the_time_they_were_recorded(predicted_run):
    early = predicted_run["before_first_step"]["predictions"]
    final = read_evidence(predicted_run["run_dir"], "training-summary")["predictions"]
    assert [p["recorded_at"] for p in final] == [p["recorded_at"] for p in early]


def test_cli_rejects_a_bad_prediction_before_creating_the_run(tiny_tokens_dir, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(tiny_tokens_dir), "--out", str(tmp_path / "run"),
                                       "--predict", "best_val_loss < 9", "--predict", "os.system('x')"])
    assert result.exit_code == 2
    assert "--predict" in result.output
    assert not (tmp_path / "run").exists()


def test_cli_refuses_predictions_on_resume(tmp_path):
    result = CliRunner().invoke(main, ["train", "--resume", str(tmp_path), "--predict", "best_val_loss < 9"])
    assert result.exit_code == 2
    assert "not on --resume" in result.output
