"""Training presets, overrides, the learning-rate schedule and the run verdicts."""

from __future__ import annotations

import pytest

from shipkit.errors import InputError
from shipkit.presets import MODEL_FIELDS, TRAIN_FIELDS, apply_overrides, get_preset, parse_set_options
from shipkit.train import convergence_status, is_divergence, lr_at, memorization_verdict


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
    with pytest.raises(InputError, match="expected a int"):
        apply_overrides(get_preset("tiny"), {"batch_size": "many"})


def test_set_without_equals_is_an_input_error() -> None:
    with pytest.raises(InputError, match="expected key=value"):
        parse_set_options(["hidden_size"])


def test_seq_len_beyond_positions_is_rejected() -> None:
    with pytest.raises(InputError, match="max_position_embeddings"):
        apply_overrides(get_preset("tiny"), {"seq_len": 4096})


def test_unknown_preset_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown preset"):
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


def test_val_well_below_train_after_two_passes_is_memorization_suspect() -> None:
    verdict = memorization_verdict([_epoch(2.0, 1.7, wraps=2.5)], threshold=0.1)
    assert verdict["verdict"] == "memorization-suspect"
    assert verdict["gap"] == pytest.approx(-0.3)


def test_val_below_train_within_the_first_pass_is_not_suspect() -> None:
    assert memorization_verdict([_epoch(2.0, 1.7, wraps=0.8)], threshold=0.1)["verdict"] == "inconclusive"


def test_small_gap_is_healthy_even_after_many_passes() -> None:
    assert memorization_verdict([_epoch(2.0, 1.95, wraps=5.0)], threshold=0.1)["verdict"] == "healthy"


def test_val_far_above_train_is_inconclusive() -> None:
    assert memorization_verdict([_epoch(1.0, 2.0, wraps=3.0)], threshold=0.1)["verdict"] == "inconclusive"


def test_threshold_decides_between_healthy_and_suspect() -> None:
    epochs = [_epoch(2.0, 1.8, wraps=2.0)]
    assert memorization_verdict(epochs, threshold=0.25)["verdict"] == "healthy"
    assert memorization_verdict(epochs, threshold=0.1)["verdict"] == "memorization-suspect"


def test_verdict_judges_the_last_epoch() -> None:
    epochs = [_epoch(2.0, 1.5, wraps=1.5), _epoch(1.5, 1.52, wraps=3.0)]
    assert memorization_verdict(epochs, threshold=0.1)["verdict"] == "healthy"


def test_no_epochs_is_inconclusive_with_null_gap() -> None:
    verdict = memorization_verdict([], threshold=0.1)
    assert (verdict["verdict"], verdict["gap"]) == ("inconclusive", None)


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
