"""A Llama-style decoder in plain torch (RMSNorm, RoPE, SwiGLU, grouped-query attention).

Parameter names follow Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM`
(`model.layers.N.self_attn.q_proj.weight`, ...) so HF export is a rename-free copy, and the
rotary embedding uses HF's rotate-half layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shipkit.errors import InputError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


@dataclass
class ModelConfig:
    """Architecture of a decoder; field names are those of HF's config.json."""

    architecture: str = "llama"  # "llama" or "qwen2" (q/k/v biases)
    vocab_size: int = 50257
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise InputError(
                f"config field architecture: {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise InputError("config field hidden_size: must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(
                "config field num_key_value_heads: must divide num_attention_heads"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def attention_bias(self) -> bool:
        return self.architecture == "qwen2"

    def expected_tensor_count(self) -> int:
        """9 tensors a layer (+3 biases for qwen2), plus embeddings, final norm, and lm_head
        unless tied: a Llama with L layers has 9·L+3 untied, 9·L+2 tied."""
        per_layer = 12 if self.attention_bias else 9
        return per_layer * self.num_hidden_layers + (2 if self.tie_word_embeddings else 3)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"model config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


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


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (T, hs) in HF's rotate-half layout (frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    positions = torch.arange(seq_len, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


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
        # RoPE on the (B, T, heads, hs) layout the projections produce, then (B, heads, T, hs).
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), cos, sin).transpose(1, 2)
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
        cos, sin = rope_cos_sin(
            input_ids.shape[1], self.config.head_dim, self.config.rope_theta, input_ids.device
        )
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
        passes precomputed `rope_cos_sin` tables of at least T rows, `fused_projections` runs
        q/k/v and gate/up as one product each (the weights are concatenated inside the step),
        `residual_dtype` carries the residual stream in that dtype.
        """
        T = input_ids.shape[1]
        if rope is None:
            rope = rope_cos_sin(T, self.config.head_dim, self.config.rope_theta, input_ids.device)
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
            state.pop("lm_head.weight", None)
        return state

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = set(self.weights())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise InputError(
                f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        self.load_state_dict(tensors, strict=not self.config.tie_word_embeddings)


def parameter_count(config: ModelConfig) -> int:
    """Stored parameters (a tied head counted once)."""
    d, f, L, V = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.vocab_size,
    )
    kv = config.num_key_value_heads * config.head_dim
    attention = d * d * 2 + d * kv * 2 + ((d + 2 * kv) if config.attention_bias else 0)
    per_layer = attention + 3 * d * f + 2 * d
    head = 0 if config.tie_word_embeddings else V * d
    return V * d + L * per_layer + d + head


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (non-embedding matmuls incl. head) + 12·L·d·T (attention)."""
    n_params = parameter_count(config) - config.vocab_size * config.hidden_size
    if config.tie_word_embeddings:
        n_params += config.vocab_size * config.hidden_size
    return 6.0 * n_params + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len

