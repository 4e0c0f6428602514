"""Read a GGUF written by `write_gguf` back into HF-named float32 torch weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from shipkit.errors import InputError, IntegrityError
from shipkit.model import ModelConfig
from shipkit.quantize.dequant import dequantize
from shipkit.quantize.formats import QType
from shipkit.quantize.tensor_names import from_interleaved, hf_name, rope_heads


def load_gguf_model(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and every tensor dequantized to float32, with HF names and layout.

    Q/K rows are put back from llama.cpp's interleaved RoPE order (arch llama). A tied
    model has no `lm_head.weight`. Raises InputError if the file is missing, IntegrityError if
    it is not a GGUF or holds tensors or keys this model cannot have.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise IntegrityError(f"{path.name}: not a readable GGUF file ({error})") from error
    config = _config(reader, path)
    weights: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise IntegrityError(f"{path.name}: unexpected tensor {tensor.name}")
        shape = tuple(int(size) for size in reversed(tensor.shape))  # ggml lists ne0 (columns) first
        values = torch.from_numpy(dequantize(tensor.data, QType(tensor.tensor_type), shape).copy())
        heads = rope_heads(name, config)
        weights[name] = from_interleaved(values, heads) if heads is not None else values
    return config, weights


def _field(reader: gguf.GGUFReader, key: str, path: Path) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise IntegrityError(f"{path.name}: missing GGUF key {key}")
    return field.contents()


def _decimal(value: float) -> float:
    """A float32 key back to the short decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _config(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture", path)
    names = {tensor.name for tensor in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise IntegrityError(f"{path.name}: no token_embd.weight tensor")
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=int(embedding.shape[1]),
            hidden_size=int(_field(reader, f"{arch}.embedding_length", path)),
            intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", path)),
            num_hidden_layers=int(_field(reader, f"{arch}.block_count", path)),
            num_attention_heads=int(_field(reader, f"{arch}.attention.head_count", path)),
            num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", path)),
            max_position_embeddings=int(_field(reader, f"{arch}.context_length", path)),
            rms_norm_eps=_decimal(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
            rope_theta=_decimal(_field(reader, f"{arch}.rope.freq_base", path)),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", path)),
            eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", path)),
        )
    except InputError as error:
        raise IntegrityError(f"{path.name}: {error}") from error
