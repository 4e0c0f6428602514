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
from shipkit.config import LM_HEAD_WEIGHT, ModelConfig, shown, weight_shapes
from shipkit.errors import InputError, ShipkitError
from shipkit.fsutil import sha256_file
from shipkit.layout import TOKENIZER_FILE
from shipkit.tokenize import copy_tokenizer
from shipkit.tokenizer_contract import read_contract

SAFETENSORS_INDEX = "model.safetensors.index.json"
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

    def to_dict(self) -> dict[str, Any]:
        return {"apr": str(self.apr_path), "tokenizer": str(self.tokenizer_path), "architecture": self.architecture,
                "tensors": self.tensor_count, "parameters": self.parameters, "source": self.source,
                "pre": self.pre, "dtypes": self.dtypes}


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
    config = ModelConfig.from_hf(hf_config, hf_dir / "config.json")
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
            tied_head = config.tie_word_embeddings and spec.name == LM_HEAD_WEIGHT
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
    """Every tensor named, shaped and typed as the config's model holds it, each once."""
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
