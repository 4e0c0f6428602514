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
from shipkit.quantize.tensor_names import (
    GGUF_ARCHITECTURES,
    MODEL_TYPE_KEY,
    ROPE_FREQS,
    ROPE_SCALING_KEY_PREFIX,
    from_interleaved,
    hf_name,
    rope_freq_factors,
    rope_heads,
)

# rope_freqs.weight against the factors of its shipkit.rope_scaling.* keys: float32 rounding apart.
ROPE_FREQS_REL_TOLERANCE = 1e-6


def load_gguf_model(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and every tensor dequantized to float32, with HF names and layout.

    Q/K rows are put back from llama.cpp's interleaved RoPE order (arch llama). A tied
    model has no `lm_head.weight`; rope_freqs.weight (llama3 RoPE) is checked against the
    config and left out. Raises InputError if the file is missing, IntegrityError if it is not a
    GGUF or holds tensors or keys this model cannot have.
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
        if tensor.name == ROPE_FREQS:
            _check_rope_freqs(np.asarray(tensor.data), config, path)
            continue
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
    family = _model_type(reader, arch, path)
    names = {tensor.name for tensor in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise IntegrityError(f"{path.name}: no token_embd.weight tensor")
    rope_scaling = _rope_scaling(reader)
    if rope_scaling is not None and ROPE_FREQS not in names:
        raise IntegrityError(f"{path.name}: {ROPE_SCALING_KEY_PREFIX}* keys without {ROPE_FREQS}: "
                             "llama.cpp would run it without its llama3 RoPE")
    try:
        return ModelConfig(
            architecture=family,
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
            head_dim=_head_dim(reader, arch, path),
            rope_scaling=rope_scaling,
        )
    except InputError as error:
        raise IntegrityError(f"{path.name}: {error}") from error


def _model_type(reader: gguf.GGUFReader, arch: str, path: Path) -> str:
    """The HF family: shipkit.model_type where the writer recorded one (mistral), else the arch."""
    field = reader.get_field(MODEL_TYPE_KEY)
    family = field.contents() if field is not None else arch
    if family not in GGUF_ARCHITECTURES:
        raise IntegrityError(f"{path.name}: architecture {family!r} is not supported "
                             f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    if GGUF_ARCHITECTURES[family] != arch:
        raise IntegrityError(f"{path.name}: {MODEL_TYPE_KEY} {family!r} is not a model of "
                             f"general.architecture {arch!r}")
    return family


def _head_dim(reader: gguf.GGUFReader, arch: str, path: Path) -> int | None:
    """attention.key_length, written when the head size is not embedding_length / head_count."""
    key_length = reader.get_field(f"{arch}.attention.key_length")
    if key_length is None:
        return None
    value_length = _field(reader, f"{arch}.attention.value_length", path)
    if value_length != key_length.contents():
        raise IntegrityError(f"{path.name}: {arch}.attention.value_length {value_length} differs "
                             f"from key_length {key_length.contents()}")
    return int(value_length)


def _rope_scaling(reader: gguf.GGUFReader) -> dict[str, Any] | None:
    scaling = {key.removeprefix(ROPE_SCALING_KEY_PREFIX): field.contents()
               for key, field in reader.fields.items() if key.startswith(ROPE_SCALING_KEY_PREFIX)}
    return scaling or None


def _check_rope_freqs(factors: np.ndarray, config: ModelConfig, path: Path) -> None:
    """llama.cpp scales RoPE by rope_freqs.weight, the torch model by the config: they must agree."""
    if config.rope_scaling is None:
        raise IntegrityError(f"{path.name}: {ROPE_FREQS} without the {ROPE_SCALING_KEY_PREFIX}* keys "
                             "of its llama3 RoPE")
    expected = rope_freq_factors(config.head_dim, config.rope_theta, config.rope_scaling).numpy()
    if factors.shape != expected.shape or not np.allclose(
            factors, expected, rtol=ROPE_FREQS_REL_TOLERANCE, atol=0):
        raise IntegrityError(f"{path.name}: {ROPE_FREQS} differs from the llama3 RoPE factors of its "
                             f"{ROPE_SCALING_KEY_PREFIX}* keys")
