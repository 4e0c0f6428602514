"""The parity metrics and tensor diagnosis as pure functions, on synthetic logits and weights."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shipkit.config import ModelConfig
from shipkit.contract import Threshold
from shipkit.parity.diagnosis import diagnose_tensor, rel_rmse, tensor_errors
from shipkit.parity.metrics import (
    PositionStats,
    agreement_metrics,
    check,
    layer_cosine_sums,
    position_stats,
    summarize,
)
from shipkit.quantize.tensor_names import from_interleaved, to_interleaved


def test_identical_logits_score_zero_kl_full_agreement_and_unit_ppl_ratio():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 50, (64,))
    metrics = summarize(position_stats(logits, logits.clone(), targets))
    assert metrics["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["kl_max"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["same_top_pct"] == 100.0
    assert metrics["ppl_ratio"] == pytest.approx(1.0)
    assert metrics["rms_dp_pct"] == pytest.approx(0.0, abs=1e-12)


def test_kl_is_that_of_base_against_quant():
    base = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    quant = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    stats = position_stats(base, quant, torch.tensor([0]))
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert stats.kl[0] == pytest.approx(expected)


def test_true_token_probability_change_is_quant_minus_base():
    base = torch.tensor([[0.0, 0.0]])
    quant = torch.tensor([[math.log(3.0), 0.0]])
    stats = position_stats(base, quant, torch.tensor([1]))
    assert stats.dp[0] == pytest.approx(0.25 - 0.5)
    metrics = summarize(stats)
    assert metrics["max_abs_dp_pct"] == pytest.approx(25.0)
    assert metrics["rms_dp_pct"] == pytest.approx(25.0)


def test_same_top_counts_positions_whose_argmax_differs():
    base = torch.eye(4) * 5
    quant = base.clone()
    quant[2] = torch.tensor([0.0, 0.0, 0.0, 5.0])
    metrics = summarize(position_stats(base, quant, torch.arange(4)))
    assert metrics["same_top_pct"] == 75.0


def test_ppl_ratio_is_the_ratio_of_the_two_perplexities():
    generator = torch.Generator().manual_seed(1)
    base, quant = torch.randn(32, 10, generator=generator), torch.randn(32, 10, generator=generator)
    targets = torch.randint(0, 10, (32,), generator=generator)
    metrics = summarize(position_stats(base, quant, targets))
    ppl = lambda logits: math.exp(torch.nn.functional.cross_entropy(logits.double(), targets).item())  # noqa: E731
    assert metrics["ppl_base"] == pytest.approx(ppl(base))
    assert metrics["ppl_ratio"] == pytest.approx(ppl(quant) / ppl(base))


def test_p99_kl_is_the_99th_percentile_of_the_positions():
    stats = PositionStats(
        kl=np.arange(1000, dtype=np.float64), same_top=np.ones(1000, bool),
        base_nll=np.ones(1000), quant_nll=np.ones(1000), dp=np.zeros(1000),
    )
    assert summarize(stats)["kl_p99"] == pytest.approx(np.percentile(np.arange(1000), 99))


def test_non_finite_quant_logits_give_null_metrics_that_fail_any_threshold():
    base = torch.zeros(3, 4)
    quant = torch.full((3, 4), float("nan"))
    metrics = summarize(position_stats(base, quant, torch.zeros(3, dtype=torch.long)))
    assert metrics["kl_mean"] is None
    assert check(metrics["kl_mean"], Threshold(1.0, "max", "r"))["verdict"] == "FAIL"


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.1, 10.0))
def test_kl_is_never_negative(seed, scale):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(8, 16, generator=generator) * scale
    quant = torch.randn(8, 16, generator=generator) * scale
    assert (position_stats(base, quant, torch.zeros(8, dtype=torch.long)).kl >= -1e-12).all()


def test_agreement_metrics_name_top1_and_kl():
    logits = torch.randn(10, 5)
    metrics = agreement_metrics(position_stats(logits, logits, torch.zeros(10, dtype=torch.long)))
    assert metrics == {"top1_pct": 100.0, "kl_mean": pytest.approx(0.0, abs=1e-12), "kl_max": pytest.approx(0.0, abs=1e-12)}


def test_check_passes_within_and_fails_beyond_the_limit():
    assert check(0.5, Threshold(1.0, "max", "r"))["verdict"] == "PASS"
    assert check(1.5, Threshold(1.0, "max", "r"))["verdict"] == "FAIL"
    assert check(99.0, Threshold(91.9, "min", "r"))["verdict"] == "PASS"
    assert check(90.0, Threshold(91.9, "min", "r"))["verdict"] == "FAIL"


def test_layer_cosines_sum_one_per_position_for_equal_states_and_minus_one_for_opposite():
    state = torch.randn(2, 3, 8)
    sums = layer_cosine_sums([state, state], [state.clone(), -state])
    assert sums == pytest.approx([6.0, -6.0])


def test_to_interleaved_interleaves_the_two_halves_of_each_head():
    weight = torch.arange(8.0).unsqueeze(1)  # 2 heads of 4 rows
    assert to_interleaved(weight, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5))
def test_from_interleaved_inverts_to_interleaved(heads, half_dim, cols):
    weight = torch.randn(heads * half_dim * 2, cols)
    assert torch.equal(from_interleaved(to_interleaved(weight, heads), heads), weight)


def _weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=generator),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(32, 64, generator=generator),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(128, 64, generator=generator),
        "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=generator),
    }


CONFIG = ModelConfig(vocab_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)


def test_tensor_errors_are_relative_rmse_per_tensor():
    base = _weights()
    quant = {name: tensor * 1.1 for name, tensor in base.items()}
    assert all(error == pytest.approx(0.1) for error in tensor_errors(base, quant).values())


def test_rel_rmse_of_a_zero_tensor_is_zero_when_matched_and_infinite_otherwise():
    assert rel_rmse(torch.zeros(4), torch.zeros(4)) == 0.0
    assert rel_rmse(torch.ones(4), torch.zeros(4)) == math.inf


def test_diagnosis_names_two_swapped_tensors():
    base = _weights()
    quant = dict(base)
    gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    quant[gate], quant[up] = base[up], base[gate]
    cause = diagnose_tensor(gate, base, quant, CONFIG, [gate, up])
    assert up in cause and "swapped" in cause


def test_diagnosis_names_a_skipped_qk_permutation():
    base = _weights()
    name = "model.layers.0.self_attn.k_proj.weight"
    quant = {**base, name: from_interleaved(base[name], CONFIG.num_key_value_heads)}
    assert "Q/K permutation" in diagnose_tensor(name, base, quant, CONFIG, [name])


def test_diagnosis_locates_a_corrupt_block():
    base = _weights()
    name = "model.layers.0.mlp.up_proj.weight"
    corrupt = base[name].clone()
    corrupt[17, 32:64] *= 50
    cause = diagnose_tensor(name, base, {**base, name: corrupt}, CONFIG, [name])
    assert "row 17 (100% of the tensor's squared error), worst at columns 32..63" in cause
