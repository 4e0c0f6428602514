"""Import an existing Hugging Face checkpoint folder (Llama or Qwen2 family) as an APR file.

The imported model then goes through the same quantize → parity → card → push path as a
trained one. Weights are stored as float32 (the parity gate's base is an F32 model).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from shipkit import __version__
from shipkit.apr import write_apr
from shipkit.errors import InputError
from shipkit.fsutil import sha256_file
from shipkit.model import ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
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


def import_hf(
    hf_dir: str | Path,
    out_path: str | Path,
    *,
    base_model: str | None = None,
    license: str | None = None,
) -> ImportReport:
    """Read `hf_dir` (config.json, safetensors shards, tokenizer.json) and write `out_path` (.apr)
    with `tokenizer.json` copied beside it. `base_model` / `license` name the upstream model for
    the card; by default they come from the folder name and its README front matter."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    hf_config = _read_json(hf_dir / "config.json")
    config = config_from_hf(hf_config, hf_dir / "config.json")
    tokenizer_src = hf_dir / TOKENIZER_FILE
    if not tokenizer_src.is_file():
        raise InputError(f"{tokenizer_src}: not found (the import needs a fast tokenizer file)")
    tensors = _read_weights(hf_dir, config)
    source = {
        "base_model": base_model or hf_dir.name,
        "license": license or _license_from_readme(hf_dir / "README.md") or "unknown",
        "model_type": hf_config["model_type"],
    }
    tokenizer_dst = out_path.parent / TOKENIZER_FILE
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer_dst.resolve() != tokenizer_src.resolve():
        shutil.copyfile(tokenizer_src, tokenizer_dst)
    metadata = {
        "kind": "weights",
        "config": config.to_dict(),
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": sha256_file(tokenizer_dst)},
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
    )


def config_from_hf(hf_config: dict[str, Any], where: Path) -> ModelConfig:
    """Map an HF config.json (transformers v4 or v5 names) to our ModelConfig."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{where}: field model_type: {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    rope = hf_config.get("rope_parameters") or {}
    legacy_scaling = hf_config.get("rope_scaling")
    if rope.get("rope_type", "default") != "default" or legacy_scaling:
        raise InputError(f"{where}: field rope_parameters: only default RoPE is supported")
    if model_type == "llama" and (hf_config.get("attention_bias") or hf_config.get("mlp_bias")):
        raise InputError(f"{where}: field attention_bias/mlp_bias: Llama with biases is not supported")
    heads = _required(hf_config, "num_attention_heads", where)
    hidden = _required(hf_config, "hidden_size", where)
    head_dim = hf_config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise InputError(f"{where}: field head_dim: {head_dim} × {heads} heads != hidden_size {hidden}")
    return ModelConfig(
        architecture=model_type,
        vocab_size=_required(hf_config, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_required(hf_config, "intermediate_size", where),
        num_hidden_layers=_required(hf_config, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_key_value_heads=hf_config.get("num_key_value_heads") or heads,
        max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        bos_token_id=_first_id(hf_config.get("bos_token_id")),
        eos_token_id=_first_id(hf_config.get("eos_token_id")),
    )


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
    return tensors


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
