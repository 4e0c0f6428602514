"""Which GGML type each tensor gets in a file type: llama.cpp's per-tensor mix.

Mirrors `llama_tensor_get_type` and the loop around it (src/llama-quant.cpp of the llama.cpp
tree in llama-cpp-python 0.3.36) for a dense llama/qwen2/qwen3 model (mistral is a llama):
- only tensors of 2+ dimensions whose name ends in "weight" and is not a norm are quantized, so
  qwen3's attn_q_norm/attn_k_norm, biases and llama3's rope_freqs stay F32;
- `--token-embedding-type` / `--output-tensor-type` win first, as given (no fallback);
- F32/F16/BF16 files give every other quantizable tensor that type;
- otherwise the file type's default type, changed per tensor by `_mixed_type`'s rules, then
  replaced by a smaller-block type where the row length is not a multiple of its block.
llama.cpp counts attn_v and ffn_down tensors as it meets them in layer order; in a dense model
the k-th of each is layer k, so the rules here read the layer from the name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, auto

from gguf import GGML_QUANT_SIZES, LlamaFileType

from shipkit.errors import InputError
from shipkit.quantize.formats import QType


@dataclass(frozen=True)
class FileType:
    """A GGUF file type we can write: its name, llama.cpp ftype and default tensor type."""

    name: str
    ftype: LlamaFileType
    default: QType


# The ladder, smallest first; names as llama-quantize spells them.
FILE_TYPES = {
    spec.name: spec
    for spec in (
        FileType("Q2_K", LlamaFileType.MOSTLY_Q2_K, QType.Q2_K),
        FileType("Q3_K_S", LlamaFileType.MOSTLY_Q3_K_S, QType.Q3_K),
        FileType("Q3_K_M", LlamaFileType.MOSTLY_Q3_K_M, QType.Q3_K),
        FileType("Q3_K_L", LlamaFileType.MOSTLY_Q3_K_L, QType.Q3_K),
        FileType("Q4_0", LlamaFileType.MOSTLY_Q4_0, QType.Q4_0),
        FileType("IQ4_NL", LlamaFileType.MOSTLY_IQ4_NL, QType.IQ4_NL),
        FileType("IQ4_XS", LlamaFileType.MOSTLY_IQ4_XS, QType.IQ4_XS),
        FileType("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, QType.Q4_K),
        FileType("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, QType.Q4_K),
        FileType("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, QType.Q5_K),
        FileType("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, QType.Q5_K),
        FileType("Q6_K", LlamaFileType.MOSTLY_Q6_K, QType.Q6_K),
        FileType("Q8_0", LlamaFileType.MOSTLY_Q8_0, QType.Q8_0),
        FileType("BF16", LlamaFileType.MOSTLY_BF16, QType.BF16),
        FileType("F16", LlamaFileType.MOSTLY_F16, QType.F16),
        FileType("F32", LlamaFileType.ALL_F32, QType.F32),
    )
}

# Types written as plain numbers, not blocks: ggml does not count them as quantized.
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
# What --output-tensor-type / --token-embedding-type may name: the types shipkit can encode.
OVERRIDE_TYPES = (*FLOAT_TYPES, QType.Q8_0, QType.Q6_K, QType.Q5_K, QType.Q4_K, QType.Q3_K,
                  QType.Q2_K, QType.Q5_1, QType.Q5_0, QType.Q4_1, QType.Q4_0, QType.IQ4_NL,
                  QType.IQ4_XS)
# tensor_type_fallback: the type a row that is not a whole number of blocks gets instead. A
# 32-weight block type has no smaller one; a row that fits none of them is stored as F16.
FALLBACKS = {QType.Q2_K: QType.Q4_0, QType.Q3_K: QType.Q4_0, QType.Q4_K: QType.Q5_0,
             QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0, QType.IQ4_XS: QType.IQ4_NL}
# llama.cpp's LLM_TYPE_70B (80 layers; for llama only with grouped KV heads) gets a bigger attn_v.
LAYERS_OF_70B = 80
_LAYER = re.compile(r"^blk\.(\d+)\.")


class Category(Enum):
    """tensor_get_category: the broad role of a tensor, from its GGUF name."""

    TOKEN_EMBD = auto()
    OUTPUT = auto()
    ATTENTION_V = auto()
    ATTENTION_OUTPUT = auto()
    FFN_DOWN = auto()
    OTHER = auto()


@dataclass(frozen=True)
class ModelShape:
    """What the mix reads from the model besides a tensor's name and shape."""

    n_layers: int
    n_gqa: int  # attention heads per KV head (hparams.n_gqa, integer division)
    tied: bool  # no output.weight: the token embedding is also the output head
    is_70b: bool = False

    @classmethod
    def of(cls, config) -> ModelShape:
        """From a shipkit ModelConfig (mistral runs as llama, so it has the llama rule)."""
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        layers = config.num_hidden_layers
        is_70b = layers == LAYERS_OF_70B and (
            config.architecture == "qwen2" or (config.architecture in ("llama", "mistral") and heads != kv_heads))
        return cls(n_layers=layers, n_gqa=heads // kv_heads, tied=config.tie_word_embeddings,
                   is_70b=is_70b)


@dataclass(frozen=True)
class Mix:
    """A file type with llama-quantize's options that change the per-tensor choice."""

    file_type: FileType
    output_type: QType | None = None  # --output-tensor-type
    token_embedding_type: QType | None = None  # --token-embedding-type
    has_imatrix: bool = False  # an importance matrix was given (changes Q4_0 and IQ4 mixes)

    def tensor_type(self, name: str, shape: tuple[int, ...], model: ModelShape) -> QType:
        """The GGML type of tensor `name` (GGUF naming, numpy shape (rows, cols)) in this file."""
        if not is_quantizable(name, shape):
            return QType.F32
        category = category_of(name)
        columns = shape[-1]
        if self.token_embedding_type is not None and category is Category.TOKEN_EMBD:
            return _fitting(name, columns, self.token_embedding_type, "token embedding type")
        if self.output_type is not None and category is Category.OUTPUT:
            return _fitting(name, columns, self.output_type, "output tensor type")
        if self.file_type.default in FLOAT_TYPES:
            return self.file_type.default
        return _fallback(columns, self._mixed_type(name, category, columns, model))

    def _mixed_type(self, name: str, category: Category, columns: int, model: ModelShape) -> QType:
        """llama_tensor_get_type_impl for the ladder's file types on a dense model."""
        kind, default = self.file_type.name, self.file_type.default
        if category is Category.OUTPUT or (model.tied and category is Category.TOKEN_EMBD):
            if self.output_type is not None:
                return self.output_type
            if columns % block_weights(default):
                return QType.Q8_0
            return default if default == QType.Q8_0 else QType.Q6_K
        layer = _layer(name)
        if category is Category.ATTENTION_V:
            chosen = self._attn_v_type(layer, model)
            if model.is_70b and chosen in (QType.Q3_K, QType.Q4_K):
                return QType.Q5_K  # 8 heads share attn_v: more bits cost little there
            return chosen
        if category is Category.FFN_DOWN:
            return self._ffn_down_type(layer, model.n_layers)
        if category is Category.ATTENTION_OUTPUT:
            return {"Q2_K": QType.Q3_K, "Q3_K_M": QType.Q4_K, "Q3_K_L": QType.Q5_K}.get(kind, default)
        return default

    def _attn_v_type(self, layer: int, model: ModelShape) -> QType:
        kind, default = self.file_type.name, self.file_type.default
        if kind == "Q2_K":
            return QType.Q4_K if model.n_gqa >= 4 else QType.Q3_K
        if kind == "Q3_K_M":
            return QType.Q5_K if layer < 2 else QType.Q4_K
        if kind == "Q3_K_L":
            return QType.Q5_K
        if kind in ("IQ4_NL", "IQ4_XS") and model.n_gqa >= 4:
            return QType.Q5_K
        if kind in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, model.n_layers):
            return QType.Q6_K
        if kind == "Q4_K_S" and layer < 4:
            return QType.Q5_K
        return default

    def _ffn_down_type(self, layer: int, n_layers: int) -> QType:
        kind, default = self.file_type.name, self.file_type.default
        first_eighth = layer < n_layers // 8
        if kind == "Q2_K":
            return QType.Q3_K
        if kind == "Q3_K_M":  # Q4_K for every later layer (a Q3_K middle is Falcon's alone)
            return QType.Q5_K if layer < n_layers // 16 else QType.Q4_K
        if kind == "Q3_K_L":
            return QType.Q5_K
        if kind in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            return QType.Q6_K
        if kind in ("IQ4_NL", "IQ4_XS") and first_eighth and not self.has_imatrix:
            return QType.Q5_K
        if kind == "Q4_K_S" and first_eighth:
            return QType.Q5_K
        if kind == "Q4_0" and first_eighth and self.has_imatrix:
            return QType.Q4_1  # llama.cpp guards the first ffn_down layers, only with an imatrix
        return default


def file_type(name: str) -> FileType:
    try:
        return FILE_TYPES[name.upper()]
    except KeyError:
        raise InputError(
            f"quantization type {name!r} is not supported (use one of {', '.join(FILE_TYPES)})"
        ) from None


def override_type(name: str, what: str) -> QType:
    """A GGML type named as llama-quantize takes it (any case: q8_0, Q6_K, bf16)."""
    for qtype in OVERRIDE_TYPES:
        if qtype.name == name.upper():
            return qtype
    raise InputError(f"{what} {name!r} is not supported "
                     f"(use one of {', '.join(qtype.name for qtype in OVERRIDE_TYPES)})")


def block_weights(qtype: QType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's layers that get more bits in *_M mixes: the first and last eighth, and every
    third layer in between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def category_of(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name == "token_embd.weight":
        return Category.TOKEN_EMBD
    for part, category in (("attn_v.weight", Category.ATTENTION_V),
                           ("attn_output.weight", Category.ATTENTION_OUTPUT),
                           ("ffn_down", Category.FFN_DOWN)):
        if part in name:
            return category
    return Category.OTHER


def _layer(name: str) -> int:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else -1


def _fitting(name: str, columns: int, qtype: QType, what: str) -> QType:
    """An override type, which llama.cpp applies without a fallback: refuse one that does not fit
    (ggml would abort on it)."""
    if columns % block_weights(qtype):
        raise InputError(f"{what} {qtype.name}: tensor {name} has rows of {columns} weights, not a "
                         f"multiple of its {block_weights(qtype)}-weight blocks")
    return qtype


def _fallback(columns: int, chosen: QType) -> QType:
    """tensor_type_fallback: a smaller-block type for rows that `chosen`'s blocks do not divide."""
    if columns % block_weights(chosen) == 0:
        return chosen
    fallback = FALLBACKS.get(chosen, chosen)
    return fallback if columns % block_weights(fallback) == 0 else QType.F16
