"""Export an APR checkpoint as a Hugging Face model folder that transformers loads as is.

The folder holds `config.json` (written so transformers v4 and v5 both read it), the weights as
`model.safetensors` (or shards plus `model.safetensors.index.json`), the tokenizer files and
`generation_config.json`. An imported model's tokenizer files (tokenizer_config.json with its chat
template, special_tokens_map.json, chat_template.jinja) are written back as they came. Tensor names are already HF's (see `shipkit.model`), so the weights are
copied byte for byte. Format details: docs/release.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from tokenizers import Tokenizer

from shipkit.apr import read_apr
from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import atomic_write, sha256_file, write_json
from shipkit.model import ModelConfig
from shipkit.tokenizer_contract import (
    CARRIED_FILES,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)

# transformers' own save_pretrained default shard limit ("5GB", decimal).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Values HF configs carry that our ModelConfig fixes by construction.
INITIALIZER_RANGE = 0.02  # std of shipkit.model.CausalLM._init_weights
HIDDEN_ACT = "silu"  # SwiGLU gate


@dataclass
class ExportReport:
    out_dir: Path
    files: list[str]
    shards: int
    tensor_count: int
    total_bytes: int  # tensor bytes over all shards (the index's metadata.total_size)


def export_hf(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportReport:
    """Write `out_dir` as an HF folder from the APR weights file `ckpt_path`.

    The tokenizer defaults to the `tokenizer.json` the APR metadata names, looked up beside the
    checkpoint and then in its parent (a run folder keeps it at `RUN_DIR/tokenizer.json`); its
    sha256 must equal the one recorded in the checkpoint. Raises InputError for a missing file or
    a non-weights checkpoint, IntegrityError for a corrupt checkpoint or a mismatched tokenizer.
    """
    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    if max_shard_bytes < 1:
        raise InputError(f"max_shard_bytes: must be positive, got {max_shard_bytes}")
    checkpoint = read_apr(ckpt_path)
    if checkpoint.metadata.get("kind") != "weights" or checkpoint.config is None:
        raise InputError(f"{ckpt_path}: not a weights checkpoint with a model config (kind "
                         f"{checkpoint.metadata.get('kind')!r}); export best.apr or epoch-NNN.apr")
    config = checkpoint.config
    tokenizer_src = _find_tokenizer(ckpt_path, checkpoint.metadata, tokenizer_path)
    tokenizer = Tokenizer.from_file(str(tokenizer_src))
    bos, eos = _token_text(tokenizer, config.bos_token_id), _token_text(tokenizer, config.eos_token_id)
    dtype = _common_dtype(checkpoint.tensors, ckpt_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    weight_files, total_bytes = _write_weights(checkpoint.tensors, out_dir, max_shard_bytes)
    write_json(out_dir / "config.json", hf_config(config, dtype))
    write_json(out_dir / "generation_config.json", {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.eos_token_id,
    })
    carried = [TOKENIZER_FILE, *(name for name in CARRIED_FILES
                                 if name != TOKENIZER_FILE and (tokenizer_src.parent / name).is_file())]
    for name in carried:
        source = tokenizer_src if name == TOKENIZER_FILE else tokenizer_src.parent / name
        with atomic_write(out_dir / name, "wb") as handle:
            handle.write(source.read_bytes())
    if TOKENIZER_CONFIG_FILE not in carried:
        # A tokenizer shipkit trained: describe it as the tokens stage uses it (no BOS, EOT-separated).
        special = {"bos_token": bos, "eos_token": eos, "pad_token": eos, "unk_token": eos}
        write_json(out_dir / SPECIAL_TOKENS_MAP_FILE, special)
        write_json(out_dir / TOKENIZER_CONFIG_FILE, {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.max_position_embeddings,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            **special,
        })
        carried += [SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE]
    files = ["config.json", "generation_config.json", *weight_files, *sorted(set(carried))]
    shards = sum(name.endswith(".safetensors") for name in weight_files)
    return ExportReport(out_dir=out_dir, files=sorted(files), shards=shards,
                        tensor_count=len(checkpoint.tensors), total_bytes=total_bytes)


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for `config`: v5 names (`rope_parameters`, `dtype`) beside the v4 ones
    (`rope_theta`, `rope_scaling`, `torch_dtype`), each version ignoring the keys it does not
    know (both read a set `rope_scaling` first, so the two RoPE entries say the same)."""
    dtype_name = str(dtype).removeprefix("torch.")
    data: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": HIDDEN_ACT,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": INITIALIZER_RANGE,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "rope_parameters": {"rope_type": "default", **(config.rope_scaling or {}),
                            "rope_theta": config.rope_theta},
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if config.architecture == "llama":
        data |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    elif config.architecture == "mistral":
        data |= {"sliding_window": None}
    else:
        data |= {"use_sliding_window": False, "sliding_window": None,
                 "max_window_layers": config.num_hidden_layers}
    if config.architecture == "qwen3":
        data |= {"attention_bias": False}
    return data


def _write_weights(
    tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int
) -> tuple[list[str], int]:
    """Greedy sharding in checkpoint order; a tensor larger than the limit gets a shard alone."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += nbytes
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    stale = [out_dir / SAFETENSORS_FILE, out_dir / SAFETENSORS_INDEX, *out_dir.glob("model-*-of-*.safetensors")]
    for path in stale:
        path.unlink(missing_ok=True)
    if len(shards) == 1:
        _write_shard(out_dir / SAFETENSORS_FILE, shards[0])
        return [SAFETENSORS_FILE], total_bytes
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards):
        _write_shard(out_dir / name, shard)
        weight_map |= {tensor_name: name for tensor_name in shard}
    write_json(out_dir / SAFETENSORS_INDEX, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    return [*names, SAFETENSORS_INDEX], total_bytes


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # transformers refuses safetensors without {"format": "pt"} metadata.
    payload = safetensors_bytes({name: t.contiguous() for name, t in tensors.items()}, metadata={"format": "pt"})
    with atomic_write(path, "wb") as handle:
        handle.write(payload)


def _find_tokenizer(ckpt_path: Path, metadata: dict[str, Any], given: str | Path | None) -> Path:
    recorded = metadata.get("tokenizer") or {}
    if given is not None:
        candidates = [Path(given)]
    else:
        file_name = recorded.get("file", TOKENIZER_FILE)
        candidates = [ckpt_path.parent / file_name, ckpt_path.parent.parent / file_name]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise InputError(f"{candidates[0]}: tokenizer not found (pass tokenizer_path / --tokenizer)")
    expected = recorded.get("sha256")
    if expected is not None and sha256_file(found) != expected:
        raise IntegrityError(f"{found}: sha256 differs from the tokenizer recorded in {ckpt_path.name}")
    return found


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    text = tokenizer.id_to_token(token_id)
    if text is None:
        raise InputError(f"tokenizer: has no token with id {token_id} (the config's bos/eos id)")
    return text


def _common_dtype(tensors: dict[str, torch.Tensor], where: Path) -> torch.dtype:
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise InputError(f"{where}: mixed floating dtypes {sorted(map(str, dtypes))}; config.json needs one")
    return dtypes.pop()
