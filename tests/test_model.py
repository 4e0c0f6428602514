"""The decoder: HF-compatible names and logits, parameter and FLOP counts; its config's weight
shapes and config.json mapping, without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shipkit.config import ModelConfig, parameter_count, weight_shapes
from shipkit.model import CausalLM, flops_per_token, rope_cos_sin

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _hf_model(config: ModelConfig):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    return transformers.LlamaForCausalLM(hf_config).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_llama_within_1e_4(tied: bool) -> None:
    config = ModelConfig(**SMALL, tie_word_embeddings=tied)
    torch.manual_seed(0)
    ours = CausalLM(config).eval()
    hf = _hf_model(config)
    hf.load_state_dict(ours.state_dict(), strict=True)
    tokens = torch.randint(0, config.vocab_size, (2, 33))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def test_state_dict_names_equal_transformers_llama() -> None:
    config = ModelConfig(**SMALL)
    assert set(CausalLM(config).state_dict()) == set(_hf_model(config).state_dict())


def test_weights_count_equals_expected_tensor_count() -> None:
    for tied in (False, True):
        config = ModelConfig(**SMALL, tie_word_embeddings=tied)
        assert len(CausalLM(config).weights()) == config.expected_tensor_count()


def test_parameter_count_equals_stored_elements() -> None:
    for tied in (False, True):
        config = ModelConfig(**SMALL, tie_word_embeddings=tied)
        stored = sum(tensor.numel() for tensor in CausalLM(config).weights().values())
        assert parameter_count(config) == stored


# One config of each architecture and shape variant: biases, q/k norms, a free head_dim,
# llama3 RoPE, a tied head.
VARIANTS = [
    ModelConfig(**SMALL),
    ModelConfig(**SMALL, architecture="qwen2", tie_word_embeddings=True),
    ModelConfig(**SMALL, architecture="qwen3", head_dim=32),
    ModelConfig(**SMALL, architecture="mistral",
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
]


@pytest.mark.parametrize("config", VARIANTS, ids=lambda config: config.architecture)
def test_weight_shapes_equal_the_models_weights_in_order(config: ModelConfig) -> None:
    """The torch-free shapes the checkpoint reader checks against are the module's own."""
    with torch.device("meta"):
        model_weights = CausalLM(config).weights()
    assert list(weight_shapes(config).items()) == [
        (name, tuple(tensor.shape)) for name, tensor in model_weights.items()
    ]


@pytest.mark.parametrize("config", VARIANTS, ids=lambda config: config.architecture)
def test_to_hf_reads_back_through_from_hf_and_transformers(config: ModelConfig, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    data = config.to_hf("bfloat16")
    assert ModelConfig.from_hf(data, tmp_path / "config.json") == config
    hf_config = transformers.AutoConfig.for_model(**data)
    assert (hf_config.head_dim, hf_config.num_key_value_heads) == (config.head_dim, config.num_key_value_heads)


def test_config_imports_without_torch() -> None:
    """The checkpoint container's, the presets' and the CLI's view of a model loads no torch."""
    code = "import sys, shipkit.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_model2_shape_has_about_370m_parameters() -> None:
    assert 3.5e8 < parameter_count(ModelConfig()) < 3.9e8


def test_flops_per_token_adds_attention_term_linear_in_seq_len() -> None:
    config = ModelConfig(**SMALL)
    per_position = 12 * config.num_hidden_layers * config.hidden_size
    assert flops_per_token(config, 65) - flops_per_token(config, 64) == per_position


def test_hidden_states_last_layer_feeds_logits() -> None:
    config = ModelConfig(**SMALL)
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 9))
    with torch.no_grad():
        states = model.hidden_states(tokens)
        logits = model.lm_head(model.model.norm(states[-1]))
        assert len(states) == config.num_hidden_layers + 1
        assert torch.equal(logits, model(tokens))


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_gpu_training_forward_options_keep_float32_hidden_states(architecture: str) -> None:
    """Fused q/k/v and gate/up products and precomputed RoPE tables compute the same states."""
    config = ModelConfig(architecture=architecture, **SMALL)
    torch.manual_seed(0)
    model = CausalLM(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 13))
    rope = rope_cos_sin(config.max_position_embeddings, config.head_dim, config.rope_theta, torch.device("cpu"))
    plain = model.final_hidden(input_ids)
    assert torch.equal(model.lm_head(plain), model(input_ids))
    assert torch.equal(model.final_hidden(input_ids, rope=rope), plain)
    fused = model.final_hidden(input_ids, rope=rope, fused_projections=True)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)


def test_bfloat16_residual_stream_stays_close_to_float32() -> None:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SMALL))
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 13))
    plain = model.final_hidden(input_ids)
    low = model.final_hidden(input_ids, residual_dtype=torch.bfloat16)
    assert 0 < (low.float() - plain).abs().max() < 0.05
