"""Read a GGUF written by `write_gguf` back into HF-named float32 torch weights, and open any
GGUF only after its header has been checked against the file's size (`open_gguf`)."""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from shipkit.config import ModelConfig
from shipkit.errors import InputError, IntegrityError
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

# The GGUF header (ggml/src/gguf.cpp): magic, version, tensor count, key count, then the keys,
# the tensor infos, padding to `general.alignment`, and the tensor data.
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # the versions gguf.GGUFReader reads
GGUF_FIXED_HEADER = struct.Struct("<4sIQQ")
ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
GGML_MAX_DIMS = 4  # llama.cpp refuses a tensor of more dimensions
# The fewest bytes a key (length, empty name, type, a one-byte value) and a tensor info (name
# length, empty name, n_dims 0, type, offset) can take: the counts are bounded by the file size
# with these before a single entry is read.
MIN_KEY_BYTES = 8 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
SCALAR_BYTES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
STRING_LENGTH_BYTES = 8
SHOWN_NAME_CHARS = 64  # a name quoted in an error stays one readable line
# What gguf.GGUFReader raises on a header it cannot parse (it checks no bound itself).
READER_ERRORS = (ValueError, KeyError, IndexError, OverflowError, MemoryError, OSError)


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """A GGUFReader over `path`, after every count, length, shape and offset of its header has
    been checked against the file's size: a lying header is refused before anything is
    allocated. Raises InputError if the file is missing, IntegrityError (naming the file and
    the entry at fault) if it is not a well-formed GGUF."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise InputError(f"{path}: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        raise IntegrityError(f"{path}: not a regular file, so not a GGUF")
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < GGUF_FIXED_HEADER.size:
            raise IntegrityError(f"{path}: {size} bytes, shorter than the {GGUF_FIXED_HEADER.size}-byte GGUF header")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _HeaderWalk(data, path).check()
    try:
        return gguf.GGUFReader(path)
    except READER_ERRORS as error:
        raise IntegrityError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from None


class _HeaderWalk:
    """Walks a GGUF header entry by entry, refusing any read past the end of the file."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.path, self.size = data, path, len(data)
        self.offset = 0
        self.order = "<"
        self.alignment = DEFAULT_ALIGNMENT

    def fail(self, message: str) -> IntegrityError:
        return IntegrityError(f"{self.path}: {message}")

    def take(self, count: int, what: str) -> int:
        """Skip `count` bytes of `what`; returns where they start."""
        start = self.offset
        if count > self.size - start:
            raise self.fail(f"{what} at byte {start} needs {count:,} bytes, the file ends at {self.size:,} "
                            "(truncated or a lying length)")
        self.offset += count
        return start

    def unpack(self, fmt: str, what: str) -> int:
        layout = struct.Struct(self.order + fmt)
        return layout.unpack_from(self.data, self.take(layout.size, what))[0]

    def string(self, what: str) -> bytes:
        length = self.unpack("Q", f"{what} length")
        start = self.take(length, what)
        return self.data[start:start + length]

    def skip_string(self, what: str) -> None:
        self.take(self.unpack("Q", f"{what} length"), what)

    def check(self) -> None:
        magic, version, tensor_count, key_count = GGUF_FIXED_HEADER.unpack_from(self.data)
        if magic != GGUF_MAGIC:
            raise self.fail(f"magic {magic!r}, not a GGUF file")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order (as GGUFReader reads it)
            self.order = ">"
            _, version, tensor_count, key_count = struct.unpack_from(">4sIQQ", self.data)
        if version not in GGUF_VERSIONS:
            raise self.fail(f"GGUF version {version}, readable are {', '.join(map(str, GGUF_VERSIONS))}")
        self.offset = GGUF_FIXED_HEADER.size
        room = self.size - self.offset
        if tensor_count * MIN_TENSOR_INFO_BYTES + key_count * MIN_KEY_BYTES > room:
            raise self.fail(f"header claims {tensor_count:,} tensors and {key_count:,} keys, more than "
                            f"its {self.size:,} bytes can hold")
        for index in range(key_count):
            self.key(index)
        tensors = [self.tensor_info(index) for index in range(tensor_count)]
        data_start = -(-self.offset // self.alignment) * self.alignment
        for name, offset, nbytes in tensors:
            start = data_start + offset
            if start + nbytes > self.size:
                raise self.fail(f"tensor {name}: data at bytes {start:,}..{start + nbytes:,} runs past the end "
                                f"of the file ({self.size:,} bytes)")

    def key(self, index: int) -> None:
        name = self.text(self.string(f"key {index} name"), f"key {index} name")
        shown = _short(name)
        value_type = self.value_type(self.unpack("I", f"key {shown} type"), f"key {shown}")
        if value_type == GGUFValueType.ARRAY:
            self.array(shown)
            return
        start = self.offset
        self.value(value_type, f"key {shown}")
        if name == ALIGNMENT_KEY:
            self.set_alignment(value_type, start)

    def array(self, name: str) -> None:
        """The items of array key `name` (quoted)."""
        item_type = self.value_type(self.unpack("I", f"key {name} item type"), f"key {name}")
        count = self.unpack("Q", f"key {name} item count")
        if item_type == GGUFValueType.ARRAY:
            raise self.fail(f"key {name}: an array of arrays (llama.cpp reads none)")
        if item_type != GGUFValueType.STRING:
            self.take(count * SCALAR_BYTES[item_type], f"key {name} ({count:,} items)")
            return
        if count * STRING_LENGTH_BYTES > self.size - self.offset:
            raise self.fail(f"key {name}: {count:,} strings cannot fit in the {self.size:,}-byte file")
        for item in range(count):
            self.skip_string(f"key {name} item {item}")

    def value(self, value_type: GGUFValueType, what: str) -> None:
        if value_type == GGUFValueType.STRING:
            self.skip_string(what)
        else:
            self.take(SCALAR_BYTES[value_type], what)

    def value_type(self, raw: int, what: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what}: unknown value type {raw}") from None

    def set_alignment(self, value_type: GGUFValueType, start: int) -> None:
        alignment = struct.unpack_from(self.order + "I", self.data, start)[0]
        if value_type != GGUFValueType.UINT32 or alignment == 0 or alignment & (alignment - 1):
            raise self.fail(f"{ALIGNMENT_KEY} must be a uint32 power of two")
        self.alignment = alignment

    def tensor_info(self, index: int) -> tuple[str, int, int]:
        """(name as shown in messages, offset in the data section, bytes) of tensor info `index`."""
        name = _short(self.text(self.string(f"tensor {index} name"), f"tensor {index} name"))
        n_dims = self.unpack("I", f"tensor {name} n_dims")
        if n_dims > GGML_MAX_DIMS:
            raise self.fail(f"tensor {name}: {n_dims:,} dimensions, at most {GGML_MAX_DIMS}")
        dims = [self.unpack("Q", f"tensor {name} shape") for _ in range(n_dims)]
        raw_type = self.unpack("I", f"tensor {name} type")
        offset = self.unpack("Q", f"tensor {name} offset")
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except ValueError:
            raise self.fail(f"tensor {name}: unknown GGML type {raw_type}") from None
        if dims and dims[0] % block:
            raise self.fail(f"tensor {name}: rows of {dims[0]:,} values, not a multiple of its type's "
                            f"{block}-value blocks")
        return name, offset, math.prod(dims) // block * block_bytes

    def text(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None


def load_gguf_model(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and every tensor dequantized to float32, with HF names and layout.

    Q/K rows are put back from llama.cpp's interleaved RoPE order (arch llama). A tied
    model has no `lm_head.weight`; rope_freqs.weight (llama3 RoPE) is checked against the
    config and left out. Raises InputError if the file is missing, IntegrityError if it is not a
    GGUF or holds tensors or keys this model cannot have.
    """
    path = Path(path)
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in model_tensors(reader, config, path).items():
        shape = tuple(int(size) for size in reversed(tensor.shape))  # ggml lists ne0 (columns) first
        values = torch.from_numpy(dequantize(tensor.data, QType(tensor.tensor_type), shape).copy())
        heads = rope_heads(name, config)
        weights[name] = from_interleaved(values, heads) if heads is not None else values
    return config, weights


def _field(reader: gguf.GGUFReader, key: str, path: Path, kind: type = int) -> Any:
    """The value of `key`, which must be a `kind` (a GGUF int key read as float is fine)."""
    field = reader.get_field(key)
    if field is None:
        raise IntegrityError(f"{path.name}: missing GGUF key {key}")
    value = field.contents()
    accepted = (int, float) if kind is float else kind
    if not isinstance(value, accepted) or isinstance(value, bool):
        raise IntegrityError(f"{path.name}: GGUF key {key} holds {type(value).__name__} {_short(value)}, "
                             f"expected {kind.__name__}")
    return value


def _short(value: Any) -> str:
    """`value` quoted and cut short for a message: a name read from a file may hold anything."""
    text = repr(value)
    return text if len(text) <= SHOWN_NAME_CHARS else text[:SHOWN_NAME_CHARS] + "…"


def _decimal(value: float) -> float:
    """A float32 key back to the short decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def gguf_config(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture", path, str)
    family = _model_type(reader, arch, path)
    names = {tensor.name for tensor in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None or len(embedding.shape) != 2:
        raise IntegrityError(f"{path.name}: no two-dimensional token_embd.weight tensor")
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
            rms_norm_eps=_decimal(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path, float)),
            rope_theta=_decimal(_field(reader, f"{arch}.rope.freq_base", path, float)),
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
    if not isinstance(family, str) or family not in GGUF_ARCHITECTURES:
        raise IntegrityError(f"{path.name}: architecture {_short(family)} is not supported "
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


def model_tensors(reader: gguf.GGUFReader, config: ModelConfig, path: Path) -> dict[str, Any]:
    """The GGUF's weight tensors by HF name; `rope_freqs` is checked against the config and left
    out (shipkit derives it). IntegrityError for a tensor this model cannot have."""
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            _check_rope_freqs(np.asarray(tensor.data), config, path)
            continue
        name = hf_name(tensor.name)
        if name is None:
            raise IntegrityError(f"{path.name}: unexpected tensor {_short(tensor.name)}")
        tensors[name] = tensor
    return tensors
