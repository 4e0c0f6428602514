"""Import an existing Hugging Face checkpoint folder (Llama or Qwen2 family) as an APR file.

The imported model then goes through the same quantize → parity → card → push path as a
trained one. Weights are stored as float32 (the parity gate's base is an F32 model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from shipkit import __version__
from shipkit.apr import write_apr
from shipkit.errors import InputError
from shipkit.fsutil import sha256_file
from shipkit.model import LLAMA3_ROPE_TYPE, CausalLM, ModelConfig
from shipkit.tokenize import copy_tokenizer
from shipkit.tokenizer_contract import read_contract

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# config.json fields that make a model a mixture of experts (Mixtral, Qwen-MoE, DeepSeek names).
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
              "moe_intermediate_size")
# The attention every layer must have: shipkit's attention is full causal, no sliding window.
FULL_ATTENTION = "full_attention"
DEFAULT_ROPE_TYPE = "default"
HIDDEN_ACT = "silu"  # SwiGLU's gate, the only MLP activation of shipkit's decoder
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class ImportReport:
    apr_path: Path
    tokenizer_path: Path
    architecture: str
    tensor_count: int
    parameters: int
    source: dict[str, Any]
    pre: str  # llama.cpp's pre-tokenizer name for the tokenizer


def import_hf(
    hf_dir: str | Path,
    out_path: str | Path,
    *,
    base_model: str | None = None,
    license: str | None = None,
    pre: str | None = None,
) -> ImportReport:
    """Read `hf_dir` (config.json, safetensors shards, tokenizer.json and its companion files)
    and write `out_path` (.apr) with the tokenizer files copied beside it. `base_model` /
    `license` name the upstream model for the card and the GGUF; by default they come from the
    folder name and its README front matter. `pre` names llama.cpp's pre-tokenizer for a
    tokenizer whose regexes shipkit does not recognise (an unknown one is refused otherwise)."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    hf_config = _read_json(hf_dir / "config.json")
    config = config_from_hf(hf_config, hf_dir / "config.json")
    tokenizer_src = hf_dir / TOKENIZER_FILE
    if not tokenizer_src.is_file():
        raise InputError(f"{tokenizer_src}: not found (the import needs a fast tokenizer file; "
                         "a SentencePiece-only tokenizer.model is not supported)")
    contract = read_contract(tokenizer_src, pre=pre, model_config=hf_config)
    tensors = _read_weights(hf_dir, config)
    source = {
        "base_model": base_model or hf_dir.name,
        "license": license or _license_from_readme(hf_dir / "README.md") or "unknown",
        "model_type": hf_config["model_type"],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(tokenizer_src, out_path.parent)
    tokenizer_dst = out_path.parent / TOKENIZER_FILE
    metadata = {
        "kind": "weights",
        "config": config.to_dict(),
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": sha256_file(tokenizer_dst), "pre": contract.pre},
        "producer": {"shipkit_version": __version__, "source": source, "epoch": 0, "step": 0},
    }
    write_apr(out_path, tensors, metadata)
    return ImportReport(
        apr_path=out_path,
        tokenizer_path=tokenizer_dst,
        architecture=config.architecture,
        tensor_count=len(tensors),
        parameters=sum(t.numel() for t in tensors.values()),
        source=source,
        pre=contract.pre,
    )


def config_from_hf(hf_config: dict[str, Any], where: Path) -> ModelConfig:
    """Map an HF config.json (transformers v4 or v5 names) to our ModelConfig; InputError, naming
    `where` and the field, for a model shipkit would not run as its authors do."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{where}: field model_type: {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    _refuse_mixture_of_experts(hf_config, where)
    _refuse_sliding_window(hf_config, model_type, where)
    _refuse_biases(hf_config, model_type, where)
    if hf_config.get("hidden_act", HIDDEN_ACT) != HIDDEN_ACT:
        raise InputError(f"{where}: field hidden_act: {hf_config['hidden_act']!r} is not supported "
                         f"(only {HIDDEN_ACT!r})")
    rope_theta, rope_scaling = _rope(hf_config, where)
    heads = _required(hf_config, "num_attention_heads", where)
    try:
        return ModelConfig(
            architecture=model_type,
            vocab_size=_required(hf_config, "vocab_size", where),
            hidden_size=_required(hf_config, "hidden_size", where),
            intermediate_size=_required(hf_config, "intermediate_size", where),
            num_hidden_layers=_required(hf_config, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=hf_config.get("num_key_value_heads") or heads,
            max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
            rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            bos_token_id=_first_id(hf_config.get("bos_token_id")),
            eos_token_id=_first_id(hf_config.get("eos_token_id")),
            head_dim=hf_config.get("head_dim"),
            rope_scaling=rope_scaling,
        )
    except InputError as error:
        raise InputError(f"{where}: {error}") from None


def _refuse_mixture_of_experts(hf_config: dict[str, Any], where: Path) -> None:
    for field in MOE_FIELDS:
        if hf_config.get(field):
            raise InputError(f"{where}: field {field}: mixture-of-experts models are not supported")


def _refuse_sliding_window(hf_config: dict[str, Any], model_type: str, where: Path) -> None:
    """Qwen switches the window on with use_sliding_window (per layer in layer_types); Mistral's
    sliding_window is in use unless null or at least the context length."""
    if hf_config.get("use_sliding_window"):
        raise InputError(f"{where}: field use_sliding_window: sliding-window attention is not supported")
    other_layers = sorted(set(hf_config.get("layer_types") or []) - {FULL_ATTENTION})
    if other_layers:
        raise InputError(f"{where}: field layer_types: {', '.join(other_layers)} layers are not "
                         f"supported (only {FULL_ATTENTION})")
    window = hf_config.get("sliding_window")
    context = hf_config.get("max_position_embeddings", 2048)
    if model_type == "mistral" and window is not None and window < context:
        raise InputError(f"{where}: field sliding_window: a window of {window} tokens (below "
                         f"max_position_embeddings {context}) is not supported")


def _refuse_biases(hf_config: dict[str, Any], model_type: str, where: Path) -> None:
    """qwen2 has q/k/v biases by construction; the other families are read without any."""
    if model_type == "qwen2":
        return
    for field in ("attention_bias", "mlp_bias"):
        if hf_config.get(field):
            raise InputError(f"{where}: field {field}: a {model_type} with biases is not supported")


def _rope(hf_config: dict[str, Any], where: Path) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, llama3 rope_scaling or None). transformers v4 and v5 both take `rope_scaling`
    over `rope_parameters` when it is set."""
    field = "rope_scaling" if hf_config.get("rope_scaling") else "rope_parameters"
    params = hf_config.get(field) or {}
    if any(isinstance(value, dict) for value in params.values()):
        raise InputError(f"{where}: field {field}: RoPE per layer type is not supported")
    rope_theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor") or hf_config.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise InputError(f"{where}: field partial_rotary_factor: {partial} is not supported (only 1.0)")
    rope_type = params.get("rope_type", params.get("type", DEFAULT_ROPE_TYPE))
    if rope_type == DEFAULT_ROPE_TYPE:
        return rope_theta, None
    if rope_type != LLAMA3_ROPE_TYPE:
        raise InputError(f"{where}: field {field}.rope_type: {rope_type!r} is not supported "
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


def _read_weights(hf_dir: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in _shard_files(hf_dir):
        try:
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():
                    tensors[name] = handle.get_tensor(name).to(torch.float32).contiguous()
        except SafetensorError as error:
            raise InputError(f"{shard}: not a readable safetensors file ({error})") from None
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tensors = {name: t for name, t in tensors.items() if not name.endswith("rotary_emb.inv_freq")}
    expected = config.expected_tensor_count()
    if len(tensors) != expected:
        raise InputError(
            f"{hf_dir}: holds {len(tensors)} tensors, but a {config.architecture} with "
            f"{config.num_hidden_layers} layers has {expected}"
        )
    _check_shapes(hf_dir, tensors, config)
    return tensors


def _check_shapes(hf_dir: Path, tensors: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Every tensor named and shaped as the config's model holds it (built on the meta device:
    shapes only, no memory)."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in CausalLM(config).weights().items()}
    for name, tensor in tensors.items():
        if name not in expected:
            raise InputError(f"{hf_dir}: tensor {name} is not part of a {config.architecture} model")
        if tuple(tensor.shape) != expected[name]:
            raise InputError(f"{hf_dir}: tensor {name} has shape {tuple(tensor.shape)}, the config "
                             f"gives {expected[name]} (check head_dim and the head counts)")


def _shard_files(hf_dir: Path) -> list[Path]:
    index_path = hf_dir / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: field weight_map is missing or empty")
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise InputError(f"{hf_dir}: no model.safetensors or {SAFETENSORS_INDEX} (only safetensors is imported)")


def _license_from_readme(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(readme).data.to_dict().get("license")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None


def _required(hf_config: dict[str, Any], field: str, where: Path) -> Any:
    if field not in hf_config:
        raise InputError(f"{where}: field {field} is missing")
    return hf_config[field]


def _first_id(token_id: int | list[int] | None) -> int:
    if isinstance(token_id, list):
        return token_id[0] if token_id else 0
    return 0 if token_id is None else token_id
