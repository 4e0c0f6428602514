"""Import an existing Hugging Face checkpoint folder (Llama or Qwen2 family) as an APR file.

The imported model then goes through the same quantize → parity → card → push path as a
trained one. Weights keep their dtype (a bf16 checkpoint stays bf16, unless `dtype` is given) and
are streamed shard by shard, tensor by tensor, a slice of rows at a time, into the APR writer,
which hashes them as they go: a 7B checkpoint imports in the memory of a few chunks.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from shipkit import __version__
from shipkit.apr import TensorSpec, apr_writer
from shipkit.apr.convert import open_safetensors, safetensors_chunks, safetensors_specs
from shipkit.apr.format import DTYPE_NAMES, WEIGHT_DTYPES, file_name_problem
from shipkit.errors import InputError, ShipkitError
from shipkit.fsutil import sha256_file
from shipkit.model import LLAMA3_ROPE_TYPE, ModelConfig, shown, weight_shapes
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
REASON_CHARS = 120  # of the tokenizers library's message, which may quote the crafted file


@dataclass
class ImportReport:
    apr_path: Path
    tokenizer_path: Path
    architecture: str
    tensor_count: int
    parameters: int
    source: dict[str, Any]
    pre: str  # llama.cpp's pre-tokenizer name for the tokenizer
    dtypes: list[str]  # the APR dtypes of the stored weights, e.g. ["BF16"]


def import_hf(
    hf_dir: str | Path,
    out_path: str | Path,
    *,
    base_model: str | None = None,
    license: str | None = None,
    pre: str | None = None,
    dtype: torch.dtype | None = None,
) -> ImportReport:
    """Read `hf_dir` (config.json, safetensors shards, tokenizer.json and its companion files)
    and write `out_path` (.apr) with the tokenizer files copied beside it. `base_model` /
    `license` name the upstream model for the card and the GGUF; by default they come from the
    folder name and its README front matter. `pre` names llama.cpp's pre-tokenizer for a
    tokenizer whose regexes shipkit does not recognise (an unknown one is refused otherwise).
    `dtype` stores the weights in that dtype; by default each keeps the checkpoint's.

    Every shard's header (names, shapes, dtypes) is checked against config.json before a byte
    is written; the APR is written through a temp file and renamed in only when complete.
    Raises InputError for an input shipkit does not import (naming the file and field or
    tensor), IntegrityError for a shard that cannot be read or a full disk."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    hf_config = _read_json(hf_dir / "config.json")
    config = config_from_hf(hf_config, hf_dir / "config.json")
    tokenizer_src = hf_dir / TOKENIZER_FILE
    if not tokenizer_src.is_file():
        raise InputError(f"{tokenizer_src}: not found (the import needs a fast tokenizer file; "
                         "a SentencePiece-only tokenizer.model is not supported)")
    _check_tokenizer(tokenizer_src, config)
    contract = read_contract(tokenizer_src, pre=pre, model_config=hf_config)
    plan = _weight_plan(hf_dir, config, dtype)
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
    _write_weights(out_path, plan, metadata)
    specs = [spec for _, _, spec in plan]
    return ImportReport(
        apr_path=out_path,
        tokenizer_path=tokenizer_dst,
        architecture=config.architecture,
        tensor_count=len(specs),
        parameters=sum(math.prod(spec.shape) for spec in specs),
        source=source,
        pre=contract.pre,
        dtypes=sorted({spec.dtype for spec in specs}),
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
    _refuse_biases(hf_config, model_type, where)
    if hf_config.get("hidden_act", HIDDEN_ACT) != HIDDEN_ACT:
        raise InputError(f"{where}: field hidden_act: {shown(hf_config['hidden_act'])} is not supported "
                         f"(only {HIDDEN_ACT!r})")
    rope_theta, rope_scaling = _rope(hf_config, where)
    heads = _required(hf_config, "num_attention_heads", where)
    kv_heads = hf_config.get("num_key_value_heads")  # null: as many as the attention heads (MHA)
    try:
        config = ModelConfig(
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


def _rope(hf_config: dict[str, Any], where: Path) -> tuple[float, dict[str, Any] | None]:
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


# (shard, the tensor as the shard holds it, the tensor as the APR stores it), in write order.
WeightPlan = list[tuple[Path, TensorSpec, TensorSpec]]


def _weight_plan(hf_dir: Path, config: ModelConfig, dtype: torch.dtype | None) -> WeightPlan:
    """The config's weights, shard by shard in file order, planned only after every shard's
    header (names, shapes, dtypes) matched the config, so a lying folder is refused before a
    byte of the APR is written. Not planned: the RoPE table some exporters save, a tied lm_head."""
    shards, weight_map = _shard_files(hf_dir)
    plan: WeightPlan = []
    held: set[str] = set()
    for shard in shards:
        for spec in _tensor_headers(shard):
            held.add(spec.name)
            if weight_map is not None:
                _check_mapped(hf_dir, weight_map, spec.name, shard)
            tied_head = config.tie_word_embeddings and spec.name == "lm_head.weight"
            if spec.name.endswith("rotary_emb.inv_freq") or tied_head:
                continue
            stored = spec if dtype is None else TensorSpec(spec.name, DTYPE_NAMES[dtype], spec.shape)
            plan.append((shard, spec, stored))
    _check_headers(hf_dir, plan, config)
    absent = sorted(set(weight_map or {}) - held)
    if absent:  # a shard cut short of a tensor, or an index naming a tensor no shard holds
        raise InputError(f"{hf_dir / SAFETENSORS_INDEX}: field weight_map: tensor {absent[0]} is in no shard "
                         f"(the index maps it to {weight_map[absent[0]]})")
    return plan


def _check_mapped(hf_dir: Path, weight_map: dict[str, str], name: str, shard: Path) -> None:
    """The index maps the tensor to the shard that holds it (transformers reads it from there)."""
    mapped = weight_map.get(name)
    if mapped != shard.name:
        where = "does not list it" if mapped is None else f"maps it to {mapped}"
        raise InputError(f"{hf_dir / SAFETENSORS_INDEX}: field weight_map: tensor {name} is in "
                         f"{shard.name}, but the index {where}")


def _write_weights(out_path: Path, plan: WeightPlan, metadata: dict[str, Any]) -> None:
    """Stream every planned tensor from its shard into the APR, a slice of rows at a time."""
    with apr_writer(out_path, [stored for _, _, stored in plan], metadata) as writer:
        for shard, group in itertools.groupby(plan, key=lambda entry: entry[0]):
            with open_safetensors(shard) as handle:
                for _, _, stored in group:
                    writer.write(stored.name, safetensors_chunks(handle, stored, shard))


def _tensor_headers(shard: Path) -> list[TensorSpec]:
    """Name, dtype and shape of every tensor of the shard, from its header; InputError for a
    file safetensors refuses (a truncated shard among them: its header and size disagree)."""
    try:
        with open_safetensors(shard) as handle:
            return safetensors_specs(handle, shard)
    except ShipkitError as error:
        raise InputError(f"{shard}: {str(error).removeprefix(f'{shard.name}: ')}") from None


def _check_headers(hf_dir: Path, plan: WeightPlan, config: ModelConfig) -> None:
    """Every tensor named, shaped and typed as the config's model holds it (shapes from a model
    on the meta device: no memory), each once."""
    expected = weight_shapes(config)
    held = collections.Counter(spec.name for _, spec, _ in plan)
    twice = sorted(name for name, count in held.items() if count > 1)
    if twice:
        raise InputError(f"{hf_dir}: tensor {twice[0]} is held by more than one shard")
    if len(plan) != len(expected):
        raise InputError(
            f"{hf_dir}: holds {len(plan)} tensors, but a {config.architecture} with "
            f"{config.num_hidden_layers} layers has {len(expected)}"
        )
    for _, spec, _ in plan:
        name, shape, dtype = spec.name, spec.shape, spec.dtype
        if name not in expected:
            raise InputError(f"{hf_dir}: tensor {name} is not part of a {config.architecture} model")
        if shape != expected[name]:
            raise InputError(f"{hf_dir}: tensor {name} has shape {shape}, the config "
                             f"gives {expected[name]} (check head_dim and the head counts)")
        if dtype not in WEIGHT_DTYPES:
            raise InputError(f"{hf_dir}: tensor {name} has dtype {dtype}; weights are "
                             f"{', '.join(WEIGHT_DTYPES)}")


def _check_tokenizer(path: Path, config: ModelConfig) -> None:
    """The tokenizers library loads `path` and every id it can produce has an embedding row."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises its own Exception type
        reason = (str(error).splitlines() or [type(error).__name__])[0][:REASON_CHARS]
        raise InputError(f"{path}: the tokenizers library cannot load it ({reason})") from None
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest >= config.vocab_size:
        raise InputError(f"{path}: holds token id {largest}, beyond config.json's vocab_size "
                         f"{config.vocab_size} (the embedding has no row for it)")


def _shard_files(hf_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files and, for a sharded folder, the index's weight_map (tensor -> shard)."""
    index_path = hf_dir / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: field weight_map is missing or empty")
        for name in set(weight_map.values()):
            why = file_name_problem(name)  # a shard lies in the folder: never a path out of it
            if why:
                raise InputError(f"{index_path}: field weight_map: shard {shown(name)} {why}")
            if not (hf_dir / name).is_file():
                raise InputError(f"{index_path}: field weight_map: shard {name} is not in {hf_dir}")
        return [hf_dir / name for name in sorted(set(weight_map.values()))], weight_map
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single], None
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
        data = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except (UnicodeDecodeError, RecursionError) as error:
        raise InputError(f"{path}: not valid UTF-8 JSON ({type(error).__name__})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _required(hf_config: dict[str, Any], field: str, where: Path) -> Any:
    if field not in hf_config:
        raise InputError(f"{where}: field {field} is missing")
    return hf_config[field]


def _first_id(token_id: int | list[int] | None) -> int:
    if isinstance(token_id, list):
        return token_id[0] if token_id else 0
    return 0 if token_id is None else token_id
