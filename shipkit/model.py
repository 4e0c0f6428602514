"""A Llama-style decoder in plain torch (RMSNorm, RoPE, SwiGLU, grouped-query attention).

Parameter names follow Hugging Face `LlamaForCausalLM` / `MistralForCausalLM` /
`Qwen2ForCausalLM` / `Qwen3ForCausalLM` (`model.layers.N.self_attn.q_proj.weight`, ...) so HF
export is a rename-free copy, and the rotary embedding uses HF's rotate-half layout.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shipkit.errors import InputError

# HF model_type values: mistral is a llama without biases; qwen2 adds q/k/v biases; qwen3 adds
# per-head RMSNorms on q and k.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
LLAMA3_ROPE_TYPE = "llama3"
# The fields of a llama3 `rope_scaling` besides rope_type (transformers' names), all required.
LLAMA3_ROPE_FIELDS: dict[str, type] = {
    "factor": float,
    "low_freq_factor": float,
    "high_freq_factor": float,
    "original_max_position_embeddings": int,
}
# llama.cpp applies per-frequency RoPE factors (rope_freqs.weight) only in its llama arch.
ROPE_SCALING_ARCHITECTURES = ("llama", "mistral")

# Upper bounds of a config, checked on construction before anything is allocated. Each admits
# every released dense model of the four families with room to spare (figures from the models'
# config.json) and refuses the sizes only a crafted file holds.
MAX_VOCAB_SIZE = 1 << 22  # 4.2M; the largest released vocabularies are ~262k (Gemma 3)
MAX_HIDDEN_SIZE = 1 << 15  # 32768; Llama 3.1 405B has 16384
MAX_INTERMEDIATE_SIZE = 1 << 17  # 131072; Llama 3.1 405B has 53248
MAX_LAYERS = 1024  # Llama 3.1 405B has 126
MAX_ATTENTION_HEADS = 1024  # Llama 3.1 405B has 128
MAX_HEAD_DIM = 1024  # released models use 64-256 (Gemma 256)
MAX_POSITIONS = 1 << 24  # 16.7M; Llama 4 Scout declares 10,485,760 positions, Qwen2.5-1M 1,010,000
MAX_PARAMETERS = 10**12  # above every released dense model (Llama 3.1 405B); bounds the sizes' product
MAX_RMS_NORM_EPS = 1.0  # released models use 1e-6..1e-5; an epsilon near 1 swamps the activations
# Integer fields -> (least, largest) value.
INT_FIELD_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, MAX_VOCAB_SIZE),
    "hidden_size": (1, MAX_HIDDEN_SIZE),
    "intermediate_size": (1, MAX_INTERMEDIATE_SIZE),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, MAX_ATTENTION_HEADS),
    "num_key_value_heads": (1, MAX_ATTENTION_HEADS),
    "max_position_embeddings": (1, MAX_POSITIONS),
}
SHOWN_CHARS = 40  # a crafted value is quoted this far in an error line, not in full


@dataclass
class ModelConfig:
    """Architecture of a decoder; field names are those of HF's config.json."""

    architecture: str = "llama"  # one of SUPPORTED_ARCHITECTURES (HF's model_type)
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
    # None: hidden_size // num_attention_heads, filled in on construction (as transformers does).
    head_dim: int | None = None
    # None (plain RoPE), or llama3 RoPE: {"rope_type": "llama3", **LLAMA3_ROPE_FIELDS}.
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """Every field checked (types, bounds, divisibility) so that a crafted config fails here,
        naming the field, rather than in a division or an allocation later."""
        if not isinstance(self.architecture, str) or self.architecture not in SUPPORTED_ARCHITECTURES:
            raise InputError(
                f"config field architecture: {shown(self.architecture)} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name, (least, largest) in INT_FIELD_RANGES.items():
            _check_int(name, getattr(self, name), least, largest)
        self.rms_norm_eps = _positive_float("rms_norm_eps", self.rms_norm_eps, MAX_RMS_NORM_EPS)
        self.rope_theta = _positive_float("rope_theta", self.rope_theta, math.inf)
        if not isinstance(self.tie_word_embeddings, bool):
            raise InputError(f"config field tie_word_embeddings: expected true or false, "
                             f"got {shown(self.tie_word_embeddings)}")
        for name in ("bos_token_id", "eos_token_id"):
            _check_int(name, getattr(self, name), 0, self.vocab_size - 1)
        self._fill_head_dim()
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(
                "config field num_key_value_heads: must divide num_attention_heads"
            )
        if self.rope_scaling is not None:
            self.rope_scaling = _llama3_rope_scaling(self.rope_scaling, self.architecture)
        parameters = parameter_count(self)
        if parameters > MAX_PARAMETERS:
            raise InputError(f"config: {parameters:,} parameters exceed the limit of {MAX_PARAMETERS:,} "
                             "(check hidden_size, intermediate_size, num_hidden_layers, vocab_size)")

    def _fill_head_dim(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise InputError(
                    "config field hidden_size: must be a multiple of num_attention_heads "
                    "(or set head_dim)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_int("head_dim", self.head_dim, 2, MAX_HEAD_DIM)
        if self.head_dim % 2:
            raise InputError(f"config field head_dim: {self.head_dim} must be even (RoPE rotates pairs)")

    @property
    def attention_bias(self) -> bool:
        return self.architecture == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Qwen3's RMSNorm over each head of q and k, before RoPE."""
        return self.architecture == "qwen3"

    @property
    def attention_size(self) -> int:
        """Width of the attention output (heads × head_dim), o_proj's input; hidden_size unless
        head_dim was set apart."""
        return self.num_attention_heads * self.head_dim

    def expected_tensor_count(self) -> int:
        """9 tensors a layer (+3 biases for qwen2, +2 q/k norms for qwen3), plus embeddings, final
        norm, and lm_head unless tied: a Llama with L layers has 9·L+3 untied, 9·L+2 tied."""
        per_layer = 9 + (3 if self.attention_bias else 0) + (2 if self.qk_norm else 0)
        return per_layer * self.num_hidden_layers + (2 if self.tie_word_embeddings else 3)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The config of `to_dict()`; a dict written before head_dim/rope_scaling existed loads
        with their defaults."""
        if not isinstance(data, dict):
            raise InputError(f"model config: expected an object, got {shown(data)}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"model config: unknown field(s) {shown(', '.join(unknown))}")
        return cls(**data)


def shown(value: Any) -> str:
    """`repr(value)` cut to SHOWN_CHARS, for error lines that quote a crafted value."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def is_int(value: Any) -> bool:
    """An int proper: bools (a subclass of int) and integral floats are not."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, least: int, largest: int) -> None:
    if not is_int(value) or not least <= value <= largest:
        raise InputError(f"config field {name}: expected an integer from {least} to {largest}, "
                         f"got {shown(value)}")


def finite_float(value: Any) -> float | None:
    """`value` as a float if it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return number if math.isfinite(number) else None


def _positive_float(name: str, value: Any, largest: float) -> float:
    """`value` as a float if it is a finite number in (0, largest]."""
    number = finite_float(value)
    if number is None or not 0 < number <= largest:
        bound = "" if largest == math.inf else f" and at most {largest:g}"
        raise InputError(f"config field {name}: expected a positive finite number{bound}, "
                         f"got {shown(value)}")
    return number


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored weight (`CausalLM.weights()`), from a model built on the
    meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        return {name: tuple(tensor.shape) for name, tensor in CausalLM(config).weights().items()}


def _llama3_rope_scaling(scaling: Any, architecture: str) -> dict[str, Any]:
    """`scaling` checked and normalised to rope_type plus LLAMA3_ROPE_FIELDS with their types."""
    if not isinstance(scaling, dict):
        raise InputError(f"config field rope_scaling: expected a dict or null, got {shown(scaling)}")
    rope_type = scaling.get("rope_type")
    if rope_type != LLAMA3_ROPE_TYPE:
        raise InputError(f"config field rope_scaling.rope_type: {shown(rope_type)} is not supported "
                         f"(only {LLAMA3_ROPE_TYPE!r}, or rope_scaling null)")
    if architecture not in ROPE_SCALING_ARCHITECTURES:
        raise InputError(f"config field rope_scaling: llama3 RoPE is supported for "
                         f"{', '.join(ROPE_SCALING_ARCHITECTURES)} only, not {architecture}")
    expected = {"rope_type", *LLAMA3_ROPE_FIELDS}
    missing, unknown = sorted(expected - set(scaling)), sorted(set(scaling) - expected)
    if missing or unknown:
        raise InputError(f"config field rope_scaling: missing {missing}, unknown {shown(unknown)}")
    normalised: dict[str, Any] = {"rope_type": LLAMA3_ROPE_TYPE}
    for name, kind in LLAMA3_ROPE_FIELDS.items():
        value = scaling[name]
        number = finite_float(value)
        if number is None or number <= 0 or (kind is int and (number != int(number) or number > MAX_POSITIONS)):
            raise InputError(f"config field rope_scaling.{name}: expected a positive finite "
                             f"{kind.__name__}, got {shown(value)}")
        normalised[name] = kind(number)
    if normalised["high_freq_factor"] <= normalised["low_freq_factor"]:
        raise InputError("config field rope_scaling.high_freq_factor: must exceed low_freq_factor")
    return normalised


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


# Weight names (HF's, as every name here): layer N's start with LAYER_PREFIX.
LAYER_PREFIX = "model.layers.{index}."
EMBEDDING_WEIGHT = "model.embed_tokens.weight"
FINAL_NORM_WEIGHT = "model.norm.weight"
LM_HEAD_WEIGHT = "lm_head.weight"


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


def parameter_count(config: ModelConfig) -> int:
    """Stored parameters (a tied head counted once)."""
    d, f, L, V = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.vocab_size,
    )
    q = config.attention_size
    kv = config.num_key_value_heads * config.head_dim
    attention = d * q * 2 + d * kv * 2  # q_proj and o_proj, k_proj and v_proj
    if config.attention_bias:
        attention += q + 2 * kv
    if config.qk_norm:
        attention += 2 * config.head_dim
    per_layer = attention + 3 * d * f + 2 * d
    head = 0 if config.tie_word_embeddings else V * d
    return V * d + L * per_layer + d + head


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (non-embedding matmuls incl. head) + 12·L·a·T (attention
    scores and values over a = heads × head_dim)."""
    n_params = parameter_count(config) - config.vocab_size * config.hidden_size
    if config.tie_word_embeddings:
        n_params += config.vocab_size * config.hidden_size
    return 6.0 * n_params + 12.0 * config.num_hidden_layers * config.attention_size * seq_len
