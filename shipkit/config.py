"""A decoder's architecture (`ModelConfig`), its weights' names and shapes, and its mapping to
and from Hugging Face's config.json.

This module imports no torch: the checkpoint container, the presets, the gates and the CLI read
and check configs without loading the model (`shipkit.model` builds the nn.Module from one).
Field names are those of HF's config.json.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipkit.errors import InputError

# HF model_type values: mistral is a llama without biases; qwen2 adds q/k/v biases; qwen3 adds
# per-head RMSNorms on q and k.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
LLAMA3_ROPE_TYPE = "llama3"
DEFAULT_ROPE_TYPE = "default"
# The fields of a llama3 `rope_scaling` besides rope_type (transformers' names), all required.
LLAMA3_ROPE_FIELDS: dict[str, type] = {
    "factor": float,
    "low_freq_factor": float,
    "high_freq_factor": float,
    "original_max_position_embeddings": int,
}
# llama.cpp applies per-frequency RoPE factors (rope_freqs.weight) only in its llama arch.
ROPE_SCALING_ARCHITECTURES = ("llama", "mistral")
# The dtypes weights can be converted to, as config.json's `torch_dtype` names them.
WEIGHT_DTYPE_NAMES = ("bfloat16", "float16", "float32")

# Values HF configs carry that our decoder fixes by construction.
INITIALIZER_RANGE = 0.02  # std of shipkit.model.CausalLM._init_weights
HIDDEN_ACT = "silu"  # SwiGLU's gate, the only MLP activation of shipkit's decoder
# config.json fields that make a model a mixture of experts (Mixtral, Qwen-MoE, DeepSeek names).
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
              "moe_intermediate_size")
# The attention every layer must have: shipkit's attention is full causal, no sliding window.
FULL_ATTENTION = "full_attention"

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

# Weight names (HF's, as every name here): layer N's start with LAYER_PREFIX.
LAYER_PREFIX = "model.layers.{index}."
EMBEDDING_WEIGHT = "model.embed_tokens.weight"
FINAL_NORM_WEIGHT = "model.norm.weight"
LM_HEAD_WEIGHT = "lm_head.weight"


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

    def to_hf(self, dtype_name: str) -> dict[str, Any]:
        """config.json for weights stored as `dtype_name` ("bfloat16", as torch names it): v5
        names (`rope_parameters`, `dtype`) beside the v4 ones (`rope_theta`, `rope_scaling`,
        `torch_dtype`), each version ignoring the keys it does not know (both read a set
        `rope_scaling` first, so the two RoPE entries say the same)."""
        data: dict[str, Any] = {
            "architectures": [HF_ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": HIDDEN_ACT,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": INITIALIZER_RANGE,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": {"rope_type": DEFAULT_ROPE_TYPE, **(self.rope_scaling or {}),
                                "rope_theta": self.rope_theta},
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": dtype_name,
            "dtype": dtype_name,
        }
        if self.architecture == "llama":
            data |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
        elif self.architecture == "mistral":
            data |= {"sliding_window": None}
        else:
            data |= {"use_sliding_window": False, "sliding_window": None,
                     "max_window_layers": self.num_hidden_layers}
        if self.architecture == "qwen3":
            data |= {"attention_bias": False}
        return data

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any], where: Path) -> ModelConfig:
        """The config of an HF config.json (transformers v4 or v5 names); InputError, naming
        `where` and the field, for a model shipkit would not run as its authors do."""
        model_type = hf_config.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise InputError(
                f"{where}: field model_type: {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        _refuse_mixture_of_experts(hf_config, where)
        _refuse_biases(hf_config, model_type, where)
        if hf_config.get("hidden_act", HIDDEN_ACT) != HIDDEN_ACT:
            raise InputError(f"{where}: field hidden_act: {shown(hf_config['hidden_act'])} is not supported "
                             f"(only {HIDDEN_ACT!r})")
        rope_theta, rope_scaling = _hf_rope(hf_config, where)
        heads = _required(hf_config, "num_attention_heads", where)
        kv_heads = hf_config.get("num_key_value_heads")  # null: as many as the attention heads (MHA)
        try:
            config = cls(
                architecture=model_type,
                vocab_size=_required(hf_config, "vocab_size", where),
                hidden_size=_required(hf_config, "hidden_size", where),
                intermediate_size=_required(hf_config, "intermediate_size", where),
                num_hidden_layers=_required(hf_config, "num_hidden_layers", where),
                num_attention_heads=heads,
                num_key_value_heads=heads if kv_heads is None else kv_heads,
                max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
                rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                tie_word_embeddings=_flag(hf_config, "tie_word_embeddings", where),
                bos_token_id=_first_id(hf_config.get("bos_token_id")),
                eos_token_id=_first_id(hf_config.get("eos_token_id")),
                head_dim=hf_config.get("head_dim"),
                rope_scaling=rope_scaling,
            )
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
        _refuse_sliding_window(hf_config, config, where)
        return config


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored weight, in the order of `shipkit.model.CausalLM.weights()`
    (a tied lm_head is not stored)."""
    d, f, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.attention_size, config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING_WEIGHT: (config.vocab_size, d)}
    for index in range(config.num_hidden_layers):
        layer: dict[str, tuple[int, ...]] = {"input_layernorm.weight": (d,)}
        for projection, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            layer[f"self_attn.{projection}.weight"] = (width, d)
            if config.attention_bias:
                layer[f"self_attn.{projection}.bias"] = (width,)
        layer["self_attn.o_proj.weight"] = (d, q)
        if config.qk_norm:
            layer |= {"self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,)}
        layer |= {"post_attention_layernorm.weight": (d,), "mlp.gate_proj.weight": (f, d),
                  "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
        prefix = LAYER_PREFIX.format(index=index)
        shapes |= {prefix + name: shape for name, shape in layer.items()}
    shapes[FINAL_NORM_WEIGHT] = (d,)
    if not config.tie_word_embeddings:
        shapes[LM_HEAD_WEIGHT] = (config.vocab_size, d)
    return shapes


def parameter_count(config: ModelConfig) -> int:
    """Stored parameters (a tied head counted once)."""
    return sum(math.prod(shape) for shape in weight_shapes(config).values())


def shown(value: Any) -> str:
    """`repr(value)` cut to SHOWN_CHARS, for error lines that quote a crafted value."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def is_int(value: Any) -> bool:
    """An int proper: bools (a subclass of int) and integral floats are not."""
    return isinstance(value, int) and not isinstance(value, bool)


def finite_float(value: Any) -> float | None:
    """`value` as a float if it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return number if math.isfinite(number) else None


def _check_int(name: str, value: Any, least: int, largest: int) -> None:
    if not is_int(value) or not least <= value <= largest:
        raise InputError(f"config field {name}: expected an integer from {least} to {largest}, "
                         f"got {shown(value)}")


def _positive_float(name: str, value: Any, largest: float) -> float:
    """`value` as a float if it is a finite number in (0, largest]."""
    number = finite_float(value)
    if number is None or not 0 < number <= largest:
        bound = "" if largest == math.inf else f" and at most {largest:g}"
        raise InputError(f"config field {name}: expected a positive finite number{bound}, "
                         f"got {shown(value)}")
    return number


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


def _refuse_mixture_of_experts(hf_config: dict[str, Any], where: Path) -> None:
    for field in MOE_FIELDS:
        if hf_config.get(field):
            raise InputError(f"{where}: field {field}: mixture-of-experts models are not supported")


def _refuse_sliding_window(hf_config: dict[str, Any], config: ModelConfig, where: Path) -> None:
    """Qwen switches the window on with use_sliding_window (per layer in layer_types); Mistral's
    sliding_window is in use unless null or at least the context length."""
    if _flag(hf_config, "use_sliding_window", where):
        raise InputError(f"{where}: field use_sliding_window: sliding-window attention is not supported")
    layer_types = hf_config.get("layer_types") or []
    if not isinstance(layer_types, list) or not all(isinstance(kind, str) for kind in layer_types):
        raise InputError(f"{where}: field layer_types: expected a list of names, got {shown(layer_types)}")
    other_layers = sorted(set(layer_types) - {FULL_ATTENTION})
    if other_layers:
        raise InputError(f"{where}: field layer_types: {shown(', '.join(other_layers))} layers are "
                         f"not supported (only {FULL_ATTENTION})")
    window = hf_config.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise InputError(f"{where}: field sliding_window: expected an integer or null, got {shown(window)}")
    context = config.max_position_embeddings
    if config.architecture == "mistral" and window is not None and window < context:
        raise InputError(f"{where}: field sliding_window: a window of {window} tokens (below "
                         f"max_position_embeddings {context}) is not supported")


def _refuse_biases(hf_config: dict[str, Any], model_type: str, where: Path) -> None:
    """qwen2 has q/k/v biases by construction; the other families are read without any."""
    if model_type == "qwen2":
        return
    for field in ("attention_bias", "mlp_bias"):
        if _flag(hf_config, field, where):
            raise InputError(f"{where}: field {field}: a {model_type} with biases is not supported")


def _flag(hf_config: dict[str, Any], field: str, where: Path) -> bool:
    """A true/false field (missing or null: false); a string such as "false" is refused, not
    read as true."""
    value = hf_config.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InputError(f"{where}: field {field}: expected true or false, got {shown(value)}")
    return value


def _hf_rope(hf_config: dict[str, Any], where: Path) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, llama3 rope_scaling or None). transformers v4 and v5 both take `rope_scaling`
    over `rope_parameters` when it is set."""
    field = "rope_scaling" if hf_config.get("rope_scaling") else "rope_parameters"
    params = hf_config.get(field) or {}
    if not isinstance(params, dict):
        raise InputError(f"{where}: field {field}: expected an object or null, got {shown(params)}")
    if any(isinstance(value, dict) for value in params.values()):
        raise InputError(f"{where}: field {field}: RoPE per layer type is not supported")
    rope_theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor") or hf_config.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise InputError(f"{where}: field partial_rotary_factor: {shown(partial)} is not supported (only 1.0)")
    rope_type = params.get("rope_type", params.get("type", DEFAULT_ROPE_TYPE))
    if rope_type == DEFAULT_ROPE_TYPE:
        return rope_theta, None
    if rope_type != LLAMA3_ROPE_TYPE:
        raise InputError(f"{where}: field {field}.rope_type: {shown(rope_type)} is not supported "
                         f"(supported: {DEFAULT_ROPE_TYPE}, {LLAMA3_ROPE_TYPE})")
    # Without one, transformers takes the context length as the original (standardize_rope_params).
    original_context = (params.get("original_max_position_embeddings")
                        or hf_config.get("original_max_position_embeddings")
                        or hf_config.get("max_position_embeddings", 2048))
    scaling = {"rope_type": LLAMA3_ROPE_TYPE, "original_max_position_embeddings": original_context}
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
        if name not in params:
            raise InputError(f"{where}: field {field}.{name} is missing (llama3 RoPE needs it)")
        scaling[name] = params[name]
    return rope_theta, scaling


def _required(hf_config: dict[str, Any], field: str, where: Path) -> Any:
    if field not in hf_config:
        raise InputError(f"{where}: field {field} is missing")
    return hf_config[field]


def _first_id(token_id: int | list[int] | None) -> int:
    if isinstance(token_id, list):
        return token_id[0] if token_id else 0
    return 0 if token_id is None else token_id
