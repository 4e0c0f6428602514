"""Which GGML type each tensor gets for a file type: llama.cpp's per-tensor mix.

Mirrors llama_tensor_get_type (src/llama-quant.cpp) for the file types we write, for a dense
llama/qwen2/qwen3 model (mistral is a llama) without an importance matrix:
- only 2-D tensors whose name ends in "weight" (and is not a norm) are quantized, so qwen3's
  attn_q_norm/attn_k_norm and llama3's rope_freqs stay F32;
- the output head, or the token embedding when it is tied to the head, gets Q6_K (Q8_0 if its
  rows are not a multiple of 256);
- Q4_K_M: attn_v and ffn_down get Q6_K on the "more bits" layers (first and last eighth, and
  every third layer in between); Q4_K_S: attn_v of the first 4 layers and ffn_down of the first
  eighth get Q5_K;
- a type whose block does not divide the row length falls back (Q4_K->Q5_0, Q5_K->Q5_1,
  Q6_K->Q8_0, then F16 if rows are not a multiple of 32 either).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import LlamaFileType

from shipkit.errors import InputError
from shipkit.quantize.formats import BLOCK_LAYOUTS, QType


@dataclass(frozen=True)
class FileType:
    """A GGUF file type we can write: its name, llama.cpp ftype and default tensor type."""

    name: str
    ftype: LlamaFileType
    default: QType


FILE_TYPES = {
    spec.name: spec
    for spec in (
        FileType("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, QType.Q4_K),
        FileType("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, QType.Q4_K),
        FileType("Q6_K", LlamaFileType.MOSTLY_Q6_K, QType.Q6_K),
        FileType("Q8_0", LlamaFileType.MOSTLY_Q8_0, QType.Q8_0),
        FileType("F16", LlamaFileType.MOSTLY_F16, QType.F16),
        FileType("F32", LlamaFileType.ALL_F32, QType.F32),
    )
}

FALLBACKS = {QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def file_type(name: str) -> FileType:
    try:
        return FILE_TYPES[name.upper()]
    except KeyError:
        raise InputError(
            f"quantization type {name!r} is not supported (use one of {', '.join(FILE_TYPES)})"
        ) from None


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's layers that get more bits in *_M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def tensor_type(name: str, shape: tuple[int, ...], spec: FileType, *, n_layers: int,
                tied: bool) -> QType:
    """The GGML type of tensor `name` (GGUF naming, numpy shape (rows, cols)) in a `spec` file."""
    if not is_quantizable(name, shape):
        return QType.F32
    if spec.default in (QType.F32, QType.F16):
        return spec.default
    columns = shape[-1]
    chosen = _mixed_type(name, columns, spec, n_layers=n_layers, tied=tied)
    return _fallback(name, columns, chosen)


def _mixed_type(name: str, columns: int, spec: FileType, *, n_layers: int, tied: bool) -> QType:
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if columns % BLOCK_LAYOUTS[spec.default].weights:
            return QType.Q8_0
        return spec.default if spec.default == QType.Q8_0 else QType.Q6_K
    match = _LAYER.match(name)
    layer = int(match.group(1)) if match else -1
    if "attn_v.weight" in name:
        if spec.name == "Q4_K_M" and use_more_bits(layer, n_layers):
            return QType.Q6_K
        if spec.name == "Q4_K_S" and layer < 4:
            return QType.Q5_K
    elif "ffn_down" in name:
        if spec.name == "Q4_K_M" and use_more_bits(layer, n_layers):
            return QType.Q6_K
        if spec.name == "Q4_K_S" and layer < n_layers // 8:
            return QType.Q5_K
    return spec.default


def _fallback(name: str, columns: int, chosen: QType) -> QType:
    if columns % BLOCK_LAYOUTS[chosen].weights == 0:
        return chosen
    if chosen not in FALLBACKS:
        raise InputError(f"tensor {name}: rows of {columns} weights do not fit {chosen.name} blocks")
    fallback = FALLBACKS[chosen]
    return fallback if columns % BLOCK_LAYOUTS[fallback].weights == 0 else QType.F16

