"""Training presets, overrides, the learning-rate schedule and the run verdicts."""

from __future__ import annotations

import pytest

from shipkit.errors import InputError
from shipkit.train.presets import (
    MODEL_FIELDS,
    TRAIN_FIELDS,
    apply_overrides,
    get_preset,
    parse_set_options,
)
from shipkit.train.trainer import lr_at
from shipkit.train.verdicts import (
    convergence_status,
    early_stop_due,
    epochs_without_improvement,
    is_divergence,
    training_verdict,
)


def _epoch(train_loss: float, val_loss: float, wraps: float) -> dict[str, float]:
    return {"train_loss": train_loss, "val_loss": val_loss, "gap": val_loss - train_loss, "wraps": wraps}


# --- presets and overrides ----------------------------------------------------------------------


def test_model2_preset_is_the_issue_recipe() -> None:
    config = get_preset("model-2")
    model = config.model
    assert (model.hidden_size, model.num_hidden_layers, model.num_attention_heads) == (1024, 24, 16)
    assert (model.num_key_value_heads, model.intermediate_size, model.vocab_size) == (4, 2816, 50257)
    assert (config.seq_len, config.batch_size, config.lr, config.warmup_steps) == (512, 16, 3e-4, 1000)
    assert (config.min_lr_ratio, config.weight_decay, config.grad_clip, config.seed) == (0.01, 0.01, 1.0, 42)


def test_model_and_train_field_names_never_collide() -> None:
    assert not set(MODEL_FIELDS) & set(TRAIN_FIELDS)


def test_set_strings_are_parsed_to_the_field_type() -> None:
    config = apply_overrides(
        get_preset("tiny"),
        parse_set_options(["hidden_size=64", "lr=0.01", "tie_word_embeddings=true", "preset=mine"]),
    )
    assert (config.model.hidden_size, config.lr, config.model.tie_word_embeddings, config.preset) == (
        64, 0.01, True, "mine",
    )


def test_overrides_leave_the_preset_untouched() -> None:
    apply_overrides(get_preset("tiny"), {"hidden_size": 64, "seq_len": 32})
    assert (get_preset("tiny").model.hidden_size, get_preset("tiny").seq_len) == (128, 128)


def test_unknown_field_is_an_input_error() -> None:
    with pytest.raises(InputError, match="hiden_size: unknown field"):
        apply_overrides(get_preset("tiny"), {"hiden_size": "3"})


def test_badly_typed_value_is_an_input_error() -> None:
    with pytest.raises(InputError, match="batch_size: expected an int, got .many."):
        apply_overrides(get_preset("tiny"), {"batch_size": "many"})


def test_set_without_equals_is_an_input_error() -> None:
    with pytest.raises(InputError, match="is not key=value"):
        parse_set_options(["hidden_size"])


def test_seq_len_beyond_positions_is_rejected() -> None:
    with pytest.raises(InputError, match="max_position_embeddings"):
        apply_overrides(get_preset("tiny"), {"seq_len": 4096})


@pytest.mark.parametrize(("field", "value"), [("train_fraction", "0"), ("train_fraction", "1.5"),
                                            ("early_stop_patience", "-1"), ("overfitting_rise_epochs", "0"),
                                            ("overfitting_gap_growth", "-0.1"), ("early_stop_patience", "2.0")])
def test_verdict_and_early_stop_fields_are_checked(field: str, value: str) -> None:
    with pytest.raises(InputError, match=field):
        apply_overrides(get_preset("tiny"), {field: value})


def test_unknown_preset_is_an_input_error() -> None:
    with pytest.raises(InputError, match="^preset: unknown preset 'huge' \\(one of tiny, "):
        get_preset("huge")


# --- schedule -----------------------------------------------------------------------------------


def test_lr_warms_up_linearly_to_the_peak() -> None:
    config = apply_overrides(get_preset("tiny"), {"lr": 1.0, "warmup_steps": 4, "num_steps": 20})
    assert [lr_at(step, config) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_lr_decays_by_cosine_to_min_ratio_at_the_last_step() -> None:
    config = apply_overrides(get_preset("tiny"), {"lr": 1.0, "warmup_steps": 0, "num_steps": 100, "min_lr_ratio": 0.01})
    assert lr_at(0, config) == 1.0
    assert lr_at(50, config) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_at(100, config) == pytest.approx(0.01)
    assert all(lr_at(step, config) >= lr_at(step + 1, config) for step in range(100))


# --- verdicts -----------------------------------------------------------------------------------
# Synthetic curves: (train_loss, val_loss, wraps) per epoch.

THRESHOLDS = {"threshold": 0.1, "gap_growth": 0.5, "rise_epochs": 2}
# The issue's H200 run of model-2 on the stdlib: 8 epochs of ~0.98 passes, val best at epoch 5.
H200_CURVE = [(6.76, 5.6, 0.98), (4.5, 4.6, 1.96), (3.6, 4.3, 2.94), (2.9, 4.1, 3.92), (2.2, 3.98, 4.9),
              (1.6, 4.05, 5.88), (1.0, 4.2, 6.86), (0.54, 4.38, 7.84)]


def _verdict(curve: list[tuple[float, float, float]], **thresholds: float) -> dict[str, object]:
    return training_verdict([_epoch(*point) for point in curve], **{**THRESHOLDS, **thresholds})


def test_no_epochs_is_too_early_with_null_gap() -> None:
    verdict = training_verdict([], **THRESHOLDS)
    assert (verdict["verdict"], verdict["rule"], verdict["gap"], verdict["best_epoch"]) == (
        "too-early", "no-epoch", None, None)


def test_a_single_epoch_is_too_early_even_past_a_pass() -> None:
    # its mean train loss starts at the untrained model's: val below it says nothing
    verdict = _verdict([(6.0, 4.0, 2.5)])
    assert (verdict["verdict"], verdict["rule"]) == ("too-early", "single-epoch")


def test_first_pass_still_falling_is_too_early() -> None:
    verdict = _verdict([(7.0, 6.0, 0.2), (5.8, 5.7, 0.4)])
    assert (verdict["verdict"], verdict["rule"]) == ("too-early", "first-pass-falling")


def test_first_pass_val_above_train_is_split_shift_even_while_falling() -> None:
    verdict = _verdict([(7.0, 6.0, 0.2), (5.0, 5.3, 0.4)])
    assert (verdict["verdict"], verdict["rule"]) == ("split-shift", "first-pass-val-above")
    assert (verdict["first_pass_epoch"], verdict["first_pass_gap"]) == (2, pytest.approx(0.3))


def test_first_pass_val_below_train_beyond_the_mean_lag_is_split_shift() -> None:
    # train fell 0.1, so the epoch mean may lag by 0.05: val 0.3 below is more than that + 0.1
    verdict = _verdict([(5.1, 5.0, 0.4), (5.0, 4.7, 0.8)])
    assert (verdict["verdict"], verdict["rule"]) == ("split-shift", "first-pass-val-below")


def test_val_below_train_that_the_mean_lag_explains_is_not_a_finding() -> None:
    # train fell 1.0: the epoch mean may sit 0.5 above the loss at the epoch's end
    assert _verdict([(6.0, 5.5, 0.3), (5.0, 4.7, 0.6)])["verdict"] == "too-early"


def test_first_pass_agreement_once_val_stopped_falling_is_healthy() -> None:
    verdict = _verdict([(5.0, 5.0, 0.4), (4.98, 4.99, 0.8)])
    assert (verdict["verdict"], verdict["rule"]) == ("healthy", "first-pass-agree")


def test_val_below_train_after_more_than_one_pass_is_memorization_suspect() -> None:
    verdict = _verdict([(5.0, 5.0, 0.8), (4.5, 4.3, 1.6), (4.2, 3.9, 2.4)])
    assert (verdict["verdict"], verdict["rule"]) == ("memorization-suspect", "val-below-train")
    assert (verdict["turn_epoch"], verdict["best_epoch"]) == (3, 3)


def test_memorization_turn_is_where_val_went_below_train_for_good() -> None:
    curve = [(5.0, 5.0, 0.8), (4.6, 4.6, 1.6), (4.5, 4.2, 2.4), (4.4, 4.0, 3.2)]
    assert _verdict(curve)["turn_epoch"] == 3


def test_val_below_train_that_the_first_pass_already_showed_is_split_shift_not_memorization() -> None:
    # the val split was 0.3 easier with every window new; it still is after three passes
    verdict = _verdict([(5.0, 4.7, 0.5), (4.9, 4.6, 1.0), (4.8, 4.5, 3.0)])
    assert (verdict["verdict"], verdict["rule"]) == ("split-shift", "first-pass-shift")


def test_val_rising_two_epochs_while_train_falls_is_overfitting_turned_after_the_best() -> None:
    verdict = _verdict([(5.0, 5.0, 0.9), (4.0, 4.5, 1.8), (3.5, 4.6, 2.7), (3.0, 4.7, 3.6)])
    assert (verdict["verdict"], verdict["rule"]) == ("overfitting", "val-rose")
    assert (verdict["best_epoch"], verdict["turn_epoch"]) == (2, 3)


def test_the_issues_h200_run_is_overfitting_turned_at_epoch_6_with_best_epoch_5() -> None:
    verdict = _verdict(H200_CURVE)
    assert (verdict["verdict"], verdict["rule"], verdict["turn_epoch"], verdict["best_epoch"]) == (
        "overfitting", "val-rose", 6, 5)


def test_early_stopping_the_h200_run_at_epoch_7_keeps_the_verdict() -> None:
    verdict = _verdict(H200_CURVE[:7])
    assert (verdict["verdict"], verdict["turn_epoch"], verdict["best_epoch"]) == ("overfitting", 6, 5)


def test_one_val_rise_is_noise_not_overfitting() -> None:
    assert _verdict([(5.0, 5.0, 0.9), (4.8, 4.8, 1.8), (4.7, 4.85, 2.7)])["verdict"] == "healthy"


def test_val_rising_with_train_is_not_overfitting() -> None:
    # both rising: the optimisation went wrong (train.convergence judges that), not the data
    assert _verdict([(5.0, 5.0, 0.9), (4.8, 4.8, 1.8), (4.85, 4.85, 2.7), (4.9, 4.9, 3.6)])["verdict"] == "healthy"


def test_val_rises_within_the_first_pass_do_not_count() -> None:
    curve = [(5.0, 5.0, 0.3), (4.9, 5.05, 0.6), (4.8, 5.1, 0.9), (4.7, 4.9, 1.2)]
    assert _verdict(curve)["rule"] != "val-rose"


def test_gap_grown_past_the_threshold_is_overfitting_from_where_it_grew() -> None:
    curve = [(5.0, 5.0, 0.9), (4.6, 4.8, 1.8), (4.0, 4.7, 2.7), (3.5, 4.65, 3.6)]
    verdict = _verdict(curve)
    assert (verdict["verdict"], verdict["rule"]) == ("overfitting", "gap-grew")
    assert (verdict["turn_epoch"], verdict["best_epoch"], verdict["gap_growth"]) == (3, 4, pytest.approx(1.15))


def test_gap_growth_is_measured_beyond_the_first_pass_gap() -> None:
    # val 0.35 above train with every window new (a split shift; up to 0.45 with the mean's lag),
    # 0.65 after two passes: grown 0.2 beyond the first pass
    curve = [(5.2, 5.5, 0.5), (5.0, 5.35, 1.0), (4.4, 5.05, 2.0)]
    verdict = _verdict(curve)
    assert (verdict["verdict"], verdict["rule"], verdict["gap_growth"]) == (
        "split-shift", "first-pass-shift", pytest.approx(0.2))
    assert _verdict(curve, gap_growth=0.1)["verdict"] == "overfitting"


def test_a_small_gap_after_many_passes_is_healthy() -> None:
    verdict = _verdict([(2.1, 2.0, 2.5), (2.0, 1.98, 5.0)])
    assert (verdict["verdict"], verdict["rule"]) == ("healthy", "agree")


def test_memorization_suspect_takes_precedence_over_a_val_rise() -> None:
    curve = [(5.0, 5.0, 0.9), (4.5, 4.0, 1.8), (4.4, 4.05, 2.7), (4.3, 4.1, 3.6)]
    assert _verdict(curve)["verdict"] == "memorization-suspect"


def test_thresholds_are_the_config_fields() -> None:
    curve = [(5.0, 5.0, 0.9), (4.6, 4.8, 1.8), (4.0, 4.7, 2.7), (3.5, 4.65, 3.6)]
    assert _verdict(curve, gap_growth=2.0)["verdict"] == "healthy"
    rising = [(5.0, 5.0, 0.9), (4.0, 4.5, 1.8), (3.5, 4.6, 2.7), (3.0, 4.7, 3.6)]
    assert _verdict(rising, rise_epochs=3, gap_growth=2.0)["verdict"] == "healthy"
    config = get_preset("tiny")
    assert (config.memorization_threshold, config.overfitting_gap_growth, config.overfitting_rise_epochs) == (
        0.1, 0.5, 2)


def test_verdict_states_its_numbers() -> None:
    verdict = _verdict(H200_CURVE)
    assert verdict["gap"] == pytest.approx(3.84) and verdict["wraps"] == 7.84
    assert verdict["train_lag"] == pytest.approx(0.23)
    assert (verdict["threshold"], verdict["overfitting_gap_growth"], verdict["overfitting_rise_epochs"]) == (
        0.1, 0.5, 2)
    assert "3.9800 (epoch 5)" in verdict["reason"]


# --- early stopping -----------------------------------------------------------------------------


def _val_curve(*val_losses: float) -> list[dict[str, float]]:
    return [_epoch(5.0, val_loss, wraps=0.1) for val_loss in val_losses]


def test_patience_zero_never_stops() -> None:
    assert not early_stop_due(_val_curve(4.0, 5.0, 6.0, 7.0), patience=0)


def test_patience_counts_epochs_since_the_best_val_loss() -> None:
    assert epochs_without_improvement(_val_curve(5.0, 4.0, 4.2, 4.1)) == 2
    assert not early_stop_due(_val_curve(5.0, 4.0, 4.2), patience=2)
    assert early_stop_due(_val_curve(5.0, 4.0, 4.2, 4.1), patience=2)


def test_an_equal_val_loss_is_not_a_new_best() -> None:
    assert epochs_without_improvement(_val_curve(4.0, 4.0, 4.0)) == 2


@pytest.mark.parametrize(
    ("val_losses", "stop_reason", "status"),
    [
        ([5.0, 4.0], "completed", "converging"),
        ([4.0, 3.99], "completed", "plateaued"),
        ([4.0, 4.2], "completed", "worsening"),
        ([5.0], "completed", "insufficient-epochs"),
        ([5.0, 4.0], "divergence", "diverged"),
        ([5.0, 4.0], "non-finite-loss", "diverged"),
    ],
)
def test_convergence_status(val_losses: list[float], stop_reason: str, status: str) -> None:
    assert convergence_status(val_losses, stop_reason) == status



def test_divergence_is_val_more_than_doubling_from_the_previous_epoch() -> None:
    assert is_divergence(previous_val_loss=2.0, val_loss=4.01)
    assert not is_divergence(previous_val_loss=2.0, val_loss=4.0)
    assert not is_divergence(previous_val_loss=None, val_loss=100.0)
