"""A Llama-style decoder in plain torch (RMSNorm, RoPE, SwiGLU, grouped-query attention).

Parameter names follow Hugging Face `LlamaForCausalLM` / `MistralForCausalLM` /
`Qwen2ForCausalLM` / `Qwen3ForCausalLM` (`model.layers.N.self_attn.q_proj.weight`, ...) so HF
export is a rename-free copy, and the rotary embedding uses HF's rotate-half layout. The
architecture it is built from, `ModelConfig`, lives apart in the torch-free `shipkit.config`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shipkit.config import LM_HEAD_WEIGHT, ModelConfig, parameter_count
from shipkit.errors import InputError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(
    head_dim: int, theta: float, device: torch.device, scaling: dict[str, Any] | None = None
) -> torch.Tensor:
    """(hs/2,) RoPE inverse frequencies, those of transformers for default and llama3 RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    return inv_freq if scaling is None else llama3_inv_freq(inv_freq, scaling)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's RoPE (transformers' `_compute_llama3_parameters`): frequencies whose wavelength
    is short against the original context are kept, long ones are divided by `factor`, and those
    in between are blended linearly in original_context / wavelength."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (original_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    kept = wavelength < original_context / high
    divided = wavelength > original_context / low
    return torch.where(kept, inv_freq, torch.where(divided, inv_freq / factor, blended))


def rope_cos_sin(
    seq_len: int,
    head_dim: int,
    theta: float,
    device: torch.device,
    scaling: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (T, hs) in HF's rotate-half layout (frequencies repeated twice)."""
    inv_freq = rope_inv_freq(head_dim, theta, device, scaling)
    positions = torch.arange(seq_len, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rope_tables(
    config: ModelConfig, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_cos_sin` for `config` (its head_dim, theta and RoPE scaling)."""
    return rope_cos_sin(seq_len, config.head_dim, config.rope_theta, device, config.rope_scaling)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.num_attention_heads
        self.n_kv_head = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)
        # Qwen3 normalises each head of q and k (weights of size hs); Identity holds no weights.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()

    def _qkv(self, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not fused:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections]) if self.q_proj.bias is not None else None
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        return F.linear(x, weight, bias).split((q_size, kv_size, kv_size), dim=-1)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x, fused)
        # q/k norm and RoPE on the (B, T, heads, hs) layout the projections produce, then
        # (B, heads, T, hs).
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim))
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim))
        q = apply_rope(q, cos, sin).transpose(1, 2)
        k = apply_rope(k, cos, sin).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            weight = torch.cat((self.gate_proj.weight, self.up_proj.weight))
            gate, up = F.linear(x, weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, fused)
        return x + self.mlp(self.post_attention_layernorm(x), fused)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder with its LM head; `state_dict()` names equal HF's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream after the embedding and after each layer: L+1 tensors (B, T, d)."""
        cos, sin = rope_tables(self.config, input_ids.shape[1], input_ids.device)
        x = self.model.embed_tokens(input_ids)
        states = [x]
        for layer in self.model.layers:
            x = layer(x, cos, sin)
            states.append(x)
        return states

    def final_hidden(
        self,
        input_ids: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        fused_projections: bool = False,
        residual_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) normed last hidden state, the LM head's input.

        The keywords are for GPU training and leave the weights and their names alone: `rope`
        passes precomputed `rope_tables` of at least T rows, `fused_projections` runs
        q/k/v and gate/up as one product each (the weights are concatenated inside the step),
        `residual_dtype` carries the residual stream in that dtype.
        """
        T = input_ids.shape[1]
        if rope is None:
            rope = rope_tables(self.config, T, input_ids.device)
        cos, sin = rope[0][:T], rope[1][:T]
        x = self.model.embed_tokens(input_ids)
        if residual_dtype is not None:
            x = x.to(residual_dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, fused_projections)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) logits."""
        return self.lm_head(self.final_hidden(input_ids))

    def weights(self) -> dict[str, torch.Tensor]:
        """Named weights as saved (a tied lm_head is not stored twice)."""
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop(LM_HEAD_WEIGHT, None)
        return state

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = set(self.weights())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise InputError(
                f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        self.load_state_dict(tensors, strict=not self.config.tie_word_embeddings)


def decoder_layer(config: ModelConfig, weights: dict[str, torch.Tensor]) -> DecoderLayer:
    """A `DecoderLayer` of `config` holding `weights` (names within the layer, such as
    `mlp.up_proj.weight`) as they are, not copied: built on the meta device, so nothing else is
    allocated. For running a model one layer at a time (the parity gate's torch engine)."""
    with torch.device("meta"):
        layer = DecoderLayer(config)
    layer.load_state_dict(weights, assign=True)
    return layer.eval()


def final_norm(config: ModelConfig, weight: torch.Tensor) -> RMSNorm:
    """The RMSNorm before the LM head, holding `weight` as it is."""
    with torch.device("meta"):
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    norm.load_state_dict({"weight": weight}, assign=True)
    return norm.eval()


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (non-embedding matmuls incl. head) + 12·L·a·T (attention
    scores and values over a = heads × head_dim)."""
    n_params = parameter_count(config) - config.vocab_size * config.hidden_size
    if config.tie_word_embeddings:
        n_params += config.vocab_size * config.hidden_size
    return 6.0 * n_params + 12.0 * config.num_hidden_layers * config.attention_size * seq_len
