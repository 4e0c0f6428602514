"""Write a GGUF v3 file from an APR weights checkpoint and its tokenizer.json (and companions).

The file is streamed: every tensor's GGUF name, type and size follow from the checkpoint's index
alone, so the header and tensor table are written first, then each tensor is read from the
memory-mapped checkpoint in its own dtype (bf16 stays bf16 until the quantizer converts it a chunk
at a time), encoded and written before the next is read. At most one tensor's values and its
encoding are held, whatever the model's size.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import torch

from shipkit.apr import read_apr
from shipkit.config import ModelConfig, parameter_count
from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import (
    check_file_target,
    check_folder_target,
    sha256_file,
    write_gguf_atomically,
)
from shipkit.layout import RunDir, find_tokenizer
from shipkit.quantize import kquants, mix
from shipkit.quantize.formats import BLOCK_LAYOUTS, QType
from shipkit.quantize.gguf_source import add_source_metadata
from shipkit.quantize.gguf_tokenizer import add_tokenizer, read_tokenizer
from shipkit.quantize.tensor_names import (
    MODEL_TYPE_KEY,
    ROPE_FREQS,
    ROPE_SCALING_KEY_PREFIX,
    gguf_architecture,
    gguf_name,
    rope_freq_factors,
    rope_heads,
    to_interleaved,
)
from shipkit.tokenizer_contract import read_contract

GGUF_SUFFIX = ".gguf"
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Values checked for NaN/Inf per pass: the temporaries of this many stay small next to a tensor.
FINITE_CHECK_CHUNK = 1 << 24
# The exponent bits of the 16-bit floats: all of them set is an Inf or a NaN. Reading the bits
# checks a bf16 tensor 6x faster here than converting it to float32 first.
NON_FINITE_EXPONENT = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
# What llama-quantize writes about an importance matrix (tools/quantize/quantize.cpp).
IMATRIX_FILE_KEY = "quantize.imatrix.file"
IMATRIX_DATASET_KEY = "quantize.imatrix.dataset"
IMATRIX_ENTRIES_KEY = "quantize.imatrix.entries_count"
IMATRIX_CHUNKS_KEY = "quantize.imatrix.chunks_count"
# llama-quantize keeps the first 127 bytes of a string it writes there (a fixed char[128]).
IMATRIX_STRING_BYTES = 127


class PlannedTensor(NamedTuple):
    """One tensor ready to encode: GGUF name, values in llama.cpp's layout, GGML type, and the
    importance of its columns (float32 (n_cols,)) when an imatrix holds it."""

    name: str
    values: torch.Tensor
    qtype: QType
    importance: np.ndarray | None = None


@dataclass
class GgufExport:
    """What `write_gguf` wrote."""

    path: Path
    file_type: str
    architecture: str
    tensor_count: int
    weights: int
    nbytes: int
    seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type name -> tensors
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    imatrix: dict[str, Any] | None = None  # `imatrix_record` of the file used, if any

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "file_type": self.file_type,
            "architecture": self.architecture, "tensor_count": self.tensor_count,
            "weights": self.weights, "bytes": self.nbytes, "seconds": round(self.seconds, 3),
            "tensor_types": self.tensor_types, "output_tensor_type": self.output_tensor_type,
            "token_embedding_type": self.token_embedding_type, "imatrix": self.imatrix,
        }


def _checked_values(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as it is (no float32 copy of a bf16 tensor: the quantizer converts a chunk at a
    time), after checking its dtype and that every value is finite, a chunk at a time."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise InputError(f"tensor {name}: dtype {tensor.dtype} is not supported "
                         "(use float64/32/16 or bfloat16)")
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), FINITE_CHECK_CHUNK):
        if not _all_finite(flat[start:start + FINITE_CHECK_CHUNK]):
            raise IntegrityError(f"tensor {name} has NaN or Inf values; refusing to export it")
    return tensor


def _all_finite(values: torch.Tensor) -> bool:
    """Whether no value is NaN or Inf (numpy: one thread, no contention with torch's pool)."""
    exponent = NON_FINITE_EXPONENT.get(values.dtype)
    if exponent is None:
        return bool(np.isfinite(values.numpy()).all())
    bits = np.bitwise_and(values.view(torch.int16).numpy(), np.int16(exponent))
    return int(bits.max(initial=0)) != exponent


def _float_payload(values: torch.Tensor, qtype: QType) -> np.ndarray:
    """F32, F16 or BF16 values; torch's casts round to nearest even, as ggml's row converters do
    (BF16 as its bits: numpy has no bfloat16)."""
    if qtype == QType.BF16:
        return values.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    return values.to(torch.float16 if qtype == QType.F16 else torch.float32).cpu().numpy()


def size_label(config: ModelConfig) -> str:
    return gguf.utility.model_weight_count_rounded_notation(parameter_count(config))


def default_file_name(base_name: str, config: ModelConfig, file_type: str) -> str:
    """`<BaseName>-<SizeLabel>-<Type>.gguf`, the GGUF naming convention."""
    return f"{base_name}-{size_label(config)}-{file_type.upper()}{GGUF_SUFFIX}"


def write_gguf(ckpt_path: str | os.PathLike[str], out_path: str | os.PathLike[str], qtype: str,
               *, tokenizer_path: str | os.PathLike[str] | None = None, device: str = "cpu",
               base_name: str | None = None, pre: str | None = None,
               imatrix: str | os.PathLike[str] | None = None, output_tensor_type: str | None = None,
               token_embedding_type: str | None = None) -> GgufExport:
    """Export a weights APR to GGUF with file type `qtype` (a name of `mix.FILE_TYPES`: Q2_K …
    Q8_0, IQ4_NL, IQ4_XS, BF16, F16, F32), every tensor as llama-quantize would write it.

    `out_path` is the .gguf file, or a folder (any path not ending in .gguf, created if need
    be) to hold `<BaseName>-<SizeLabel>-<Type>.gguf`. The tokenizer is `tokenizer_path` or the
    one the checkpoint names, beside it then one folder up (`shipkit.layout.find_tokenizer`, as
    export finds it); its keys come from the tokenizer's contract (shipkit.tokenizer_contract); `pre` names llama.cpp's pre-tokenizer
    instead of the detected one (an expert's override). `imatrix` is an importance matrix file
    (llama.cpp's GGUF imatrix format, checked against this model's tensors); `output_tensor_type`
    and `token_embedding_type` are GGML type names that replace the mix's choice for those two
    tensors, as llama-quantize's options of the same names do.
    Raises InputError for a missing/unsupported input, an imatrix of another model or an
    `out_path` of the wrong kind (a file where a folder is meant, or the reverse),
    IntegrityError for NaN/Inf weights, a tokenizer other than the recorded one or a full disk.
    """
    started = time.perf_counter()
    spec = mix.file_type(qtype)
    output_type = None if output_tensor_type is None else mix.override_type(output_tensor_type, "output tensor type")
    embedding_type = (None if token_embedding_type is None
                      else mix.override_type(token_embedding_type, "token embedding type"))
    out_path = Path(out_path)
    _check_out_path(out_path)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device}: no CUDA device is available (use cpu)")
    ckpt_path = Path(ckpt_path)
    checkpoint = read_apr(ckpt_path)
    if "config" not in checkpoint.metadata:
        raise InputError(f"{ckpt_path}: no model config in its metadata (not a weights checkpoint)")
    config = ModelConfig.from_dict(checkpoint.metadata["config"])
    tokenizer_file = find_tokenizer(ckpt_path, checkpoint.metadata, tokenizer_path)
    contract = read_contract(tokenizer_file, pre=pre or _recorded_pre(checkpoint.metadata, tokenizer_file),
                             model_config=config.to_dict())
    tokenizer = read_tokenizer(tokenizer_file, config.vocab_size)
    base_name = base_name or _default_base_name(ckpt_path)
    if _names_a_folder(out_path):
        out_path = out_path / default_file_name(base_name, config, spec.name)
        check_file_target(out_path, "out_path")
    matrix = None if imatrix is None else _load_imatrix(Path(imatrix))
    quant_mix = mix.Mix(spec, output_type=output_type, token_embedding_type=embedding_type,
                        has_imatrix=matrix is not None and bool(matrix.importance))

    derived = derived_tensors(config)
    table = [*((tensor.name, tuple(tensor.values.shape), tensor.qtype) for tensor in derived),
             *(tensor_entry(name, tuple(tensor.shape), config, quant_mix)
               for name, tensor in checkpoint.tensors.items())]
    record = None
    if matrix is not None:
        matrix.check_model({target: shape for target, shape, _ in table}, source=ckpt_path)
        record = imatrix_record(Path(imatrix), matrix)
    writer = gguf.GGUFWriter(None, gguf_architecture(config))
    _add_metadata(writer, config, spec, base_name)
    add_tokenizer(writer, tokenizer, contract, architecture=config.architecture)
    source = checkpoint.metadata.get("producer", {}).get("source")
    add_source_metadata(writer, source if isinstance(source, dict) else {})  # convert records a file name
    if record is not None:
        _add_imatrix_keys(writer, record)
    tensor_bytes = sum(_add_tensor_info(writer, *entry) for entry in table)
    importance = matrix.importance if matrix is not None else None

    def planned() -> Iterator[PlannedTensor]:
        yield from derived
        for name, tensor in checkpoint.tensors.items():
            yield plan_tensor(name, tensor, config, quant_mix, importance)


    def write_body() -> None:
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for entry in planned():
            _write_tensor(writer, encode_tensor(entry, device), out_path.parent)

    # a killed or failed write leaves any previous file whole (fsutil.write_gguf_atomically)
    write_gguf_atomically(writer, out_path, write_body, f"the tensor data of {out_path.name}", tensor_bytes)
    counts = Counter(ggml_type.name for _, _, ggml_type in table)
    return GgufExport(path=out_path, file_type=spec.name, architecture=config.architecture,
                      tensor_count=len(table), weights=sum(math.prod(shape) for _, shape, _ in table),
                      nbytes=out_path.stat().st_size, seconds=time.perf_counter() - started,
                      tensor_types=dict(sorted(counts.items())),
                      output_tensor_type=output_type.name if output_type else None,
                      token_embedding_type=embedding_type.name if embedding_type else None,
                      imatrix=record)


def _load_imatrix(path: Path) -> Any:
    """The imatrix stage's reader, imported only when a file is given."""
    from shipkit.imatrix import load_imatrix

    return load_imatrix(path)


def imatrix_record(path: Path, matrix: Any) -> dict[str, Any]:
    """What the evidence and the GGUF keep of an importance matrix: the file name (not its local
    folder: the GGUF is published), sha256, entry and chunk counts, dataset and calibration."""
    return {"file": path.name, "sha256": sha256_file(path), "entries": len(matrix.importance),
            "chunks": int(matrix.chunk_count), "dataset": matrix.datasets[0] if matrix.datasets else None,
            "calibration": matrix.calibration}


def _add_imatrix_keys(writer: gguf.GGUFWriter, record: dict[str, Any]) -> None:
    """llama-quantize's keys for an imatrix; the counts as uint32, as its integer overrides are."""
    writer.add_string(IMATRIX_FILE_KEY, _clipped(record["file"]))
    if record["dataset"] is not None:
        writer.add_string(IMATRIX_DATASET_KEY, _clipped(record["dataset"]))
    writer.add_uint32(IMATRIX_ENTRIES_KEY, record["entries"])
    if record["chunks"] > 0:
        writer.add_uint32(IMATRIX_CHUNKS_KEY, record["chunks"])


def _clipped(text: str) -> str:
    """`text` cut to llama-quantize's 127 bytes (on a character boundary)."""
    return text.encode()[:IMATRIX_STRING_BYTES].decode(errors="ignore")


def _add_tensor_info(writer: gguf.GGUFWriter, target: str, shape: tuple[int, ...], ggml_type: QType) -> int:
    """Declare one tensor in the writer's table (before any data is written); returns its bytes.
    Quantized tensors are declared by their bytes per row, as gguf-py's add_tensor does."""
    if ggml_type in (QType.F32, QType.F16):
        dtype = np.float32 if ggml_type == QType.F32 else np.float16
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        writer.add_tensor_info(target, shape, np.dtype(dtype), nbytes)
        return nbytes
    layout = BLOCK_LAYOUTS[ggml_type]
    row_bytes = shape[-1] // layout.weights * layout.nbytes
    nbytes = math.prod(shape[:-1]) * row_bytes
    writer.add_tensor_info(target, (*shape[:-1], row_bytes), np.dtype(np.uint8), nbytes, raw_dtype=ggml_type)
    return nbytes


def _names_a_folder(out_path: Path) -> bool:
    return out_path.is_dir() or out_path.suffix.lower() != GGUF_SUFFIX


def _check_out_path(out_path: Path) -> None:
    """Refuse, before any work, an `out_path` that cannot be written as what it names."""
    if not _names_a_folder(out_path):
        check_file_target(out_path, "out_path")
    elif os.path.lexists(out_path) and not out_path.is_dir():
        raise InputError(f"out_path {out_path}: is a file without the {GGUF_SUFFIX} suffix; "
                         f"give a {GGUF_SUFFIX} path or a folder")
    else:
        check_folder_target(out_path, "out_path")


def tensor_entry(name: str, shape: tuple[int, ...], config: ModelConfig, quant_mix: mix.Mix
                 ) -> tuple[str, tuple[int, ...], QType]:
    """(GGUF name, shape, GGML type) of a checkpoint tensor, from its name and shape alone."""
    target = gguf_name(name)
    if target is None:
        raise InputError(f"tensor {name}: no GGUF equivalent for architecture {config.architecture}")
    return target, shape, quant_mix.tensor_type(target, shape, mix.ModelShape.of(config))


def plan_tensor(name: str, tensor: torch.Tensor, config: ModelConfig, quant_mix: mix.Mix,
                importance: dict[str, np.ndarray] | None = None) -> PlannedTensor:
    """One checkpoint tensor ready to encode: values in llama.cpp's layout and the checkpoint's
    dtype, with its columns' importance where `importance` (GGUF name -> vector) holds it."""
    target, _, ggml_type = tensor_entry(name, tuple(tensor.shape), config, quant_mix)
    values = _checked_values(name, tensor)
    heads = rope_heads(name, config)
    if heads is not None:
        values = to_interleaved(values, heads)
    return PlannedTensor(target, values, ggml_type, (importance or {}).get(target))


def derived_tensors(config: ModelConfig) -> list[PlannedTensor]:
    """Tensors llama.cpp needs that the checkpoint does not hold, first in the file as llama.cpp's
    converter writes them: rope_freqs.weight (F32) for llama3 RoPE."""
    if config.rope_scaling is None:
        return []
    factors = rope_freq_factors(config.head_dim, config.rope_theta, config.rope_scaling)
    return [PlannedTensor(ROPE_FREQS, factors, QType.F32)]


def encode_tensor(tensor: PlannedTensor, device: str) -> np.ndarray:
    """The tensor's payload: its values as F32/F16/BF16, or its rows of quant blocks."""
    if tensor.qtype in mix.FLOAT_TYPES:
        return _float_payload(tensor.values, tensor.qtype)
    blocks = kquants.quantize(tensor.values, tensor.qtype, device=device, importance=tensor.importance)
    return blocks.reshape(tensor.values.shape[0], -1)


def _recorded_pre(metadata: dict[str, Any], tokenizer_file: Path) -> str | None:
    """The pre-tokenizer name import recorded (`--pre` there), if this is the tokenizer it was for."""
    recorded = metadata.get("tokenizer") or {}
    if recorded.get("pre") and recorded.get("sha256") == sha256_file(tokenizer_file):
        return recorded["pre"]
    return None


def _default_base_name(ckpt_path: Path) -> str:
    """The run folder's name for RUN_DIR/ckpt/x.apr, else the checkpoint's stem."""
    folder = ckpt_path.resolve().parent
    return folder.parent.name if folder.name == RunDir.CKPT else ckpt_path.stem


def _add_metadata(writer: gguf.GGUFWriter, config: ModelConfig, spec: mix.FileType,
                  base_name: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(base_name)
    writer.add_size_label(size_label(config))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        # llama.cpp otherwise takes head size = embedding_length / head_count.
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if gguf_architecture(config) != config.architecture:
        writer.add_string(MODEL_TYPE_KEY, config.architecture)
    for name, value in (config.rope_scaling or {}).items():
        _add_typed(writer, ROPE_SCALING_KEY_PREFIX + name, value)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(spec.ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_typed(writer: gguf.GGUFWriter, key: str, value: str | int | float) -> None:
    """A string, uint32 or float64 key; float64 so the value reads back exactly."""
    if isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    else:
        writer.add_float64(key, value)


def _write_tensor(writer: gguf.GGUFWriter, payload: np.ndarray, directory: Path) -> None:
    try:
        writer.write_tensor_data(payload)
    except OSError as error:
        # numpy's tofile reports a short write without its errno; on a disk without room it is ENOSPC
        if error.errno is None and shutil.disk_usage(directory).free < payload.nbytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from error
        raise


