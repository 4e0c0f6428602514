"""HF <-> GGUF names (tensors, architectures, shipkit's own keys), llama.cpp's Q/K row order and
its llama3 RoPE factors (constants and pure functions)."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from shipkit.config import ModelConfig

# HF family -> GGUF general.architecture: to llama.cpp a Mistral without a sliding window is a llama.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp rotates adjacent pairs (2i, 2i+1) in these archs; the others use NEOX RoPE, HF's layout.
INTERLEAVED_ROPE_ARCHITECTURES = ("llama",)
# llama3 RoPE as llama.cpp reads it: one factor per frequency, dividing theta^(-2i/hs).
ROPE_FREQS = "rope_freqs.weight"
# shipkit's own GGUF keys (llama.cpp ignores keys it does not know), for what standard keys cannot
# carry back to a ModelConfig: the HF family where it is not the GGUF arch (mistral), and the llama3
# RoPE parameters, which rope_freqs.weight alone does not determine.
MODEL_TYPE_KEY = "shipkit.model_type"
ROPE_SCALING_KEY_PREFIX = "shipkit.rope_scaling."

GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_LAYER_NAMES_BACK = {gguf: hf for hf, gguf in LAYER_NAMES.items()}
_GLOBAL_NAMES_BACK = {gguf: hf for hf, gguf in GLOBAL_NAMES.items()}


def gguf_name(hf_name: str) -> str | None:
    """GGUF name of an HF tensor name, None if it has none."""
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    match = _HF_LAYER.match(hf_name)
    if match and match.group(2) in LAYER_NAMES:
        return f"blk.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
    return None


def hf_name(gguf_tensor_name: str) -> str | None:
    if gguf_tensor_name in _GLOBAL_NAMES_BACK:
        return _GLOBAL_NAMES_BACK[gguf_tensor_name]
    match = _GGUF_LAYER.match(gguf_tensor_name)
    if match and match.group(2) in _LAYER_NAMES_BACK:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES_BACK[match.group(2)]}"
    return None


def gguf_architecture(config: ModelConfig) -> str:
    """The GGUF general.architecture llama.cpp runs `config` as."""
    return GGUF_ARCHITECTURES[config.architecture]


def rope_heads(hf_tensor_name: str, config: ModelConfig) -> int | None:
    """Heads to permute for llama.cpp's interleaved RoPE: Q and K of GGUF arch llama only.

    HF rotates halves of each head (dims i and i+hs/2 pair up); llama.cpp's llama rotates
    adjacent pairs (2i, 2i+1). qwen2/qwen3 use llama.cpp's NEOX RoPE, which is HF's layout.
    """
    if gguf_architecture(config) not in INTERLEAVED_ROPE_ARCHITECTURES:
        return None
    if hf_tensor_name.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if hf_tensor_name.endswith("self_attn.k_proj.weight"):
        return config.num_key_value_heads
    return None


def rope_freq_factors(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """(hs/2,) float32 rope_freqs.weight for llama3 RoPE `scaling`, as llama.cpp's converter
    computes it (`LlamaModel.generate_extra_tensors`, in float32): 1 for wavelengths short against
    the original context, `factor` for long ones, the blend in between."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / freqs
    smooth = (original_context / wavelength - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    short, long = wavelength < original_context / high, wavelength > original_context / low
    return torch.where(short, 1.0, torch.where(long, factor, blended)).to(torch.float32)


def to_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from (half, pair) order to (pair, half): HF -> llama.cpp."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def from_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `to_interleaved`: llama.cpp -> HF."""
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))
