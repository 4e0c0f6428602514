"""Write a GGUF v3 file from an APR weights checkpoint and its tokenizer.json (and companions)."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from shipkit.apr import read_apr
from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import sha256_file
from shipkit.model import ModelConfig, parameter_count
from shipkit.quantize import kquants, mix
from shipkit.quantize.formats import QType
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

TOKENIZER_FILE = "tokenizer.json"
GGUF_SUFFIX = ".gguf"
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "file_type": self.file_type,
            "architecture": self.architecture, "tensor_count": self.tensor_count,
            "weights": self.weights, "bytes": self.nbytes, "seconds": round(self.seconds, 3),
            "tensor_types": self.tensor_types,
        }


def find_tokenizer(ckpt_path: Path, tokenizer_path: str | os.PathLike[str] | None) -> Path:
    """The tokenizer given, else `<ckpt dir>/../tokenizer.json`, else `<ckpt dir>/tokenizer.json`."""
    if tokenizer_path is not None:
        candidates = [Path(tokenizer_path)]
    else:
        candidates = [ckpt_path.parent.parent / TOKENIZER_FILE, ckpt_path.parent / TOKENIZER_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InputError(f"no tokenizer found at {' or '.join(map(str, candidates))} "
                     "(pass --tokenizer PATH)")


def _float32(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype not in FLOAT_DTYPES:
        raise InputError(f"tensor {name}: dtype {tensor.dtype} is not supported "
                         "(use float64/32/16 or bfloat16)")
    values = tensor.to(torch.float32).contiguous()
    if not np.isfinite(values.numpy()).all():  # numpy: one thread, no contention with torch's pool
        raise IntegrityError(f"tensor {name} has NaN or Inf values; refusing to export it")
    return values


def _float_payload(values: torch.Tensor, qtype: QType) -> np.ndarray:
    return values.to(torch.float16 if qtype == QType.F16 else torch.float32).cpu().numpy()


def size_label(config: ModelConfig) -> str:
    return gguf.utility.model_weight_count_rounded_notation(parameter_count(config))


def default_file_name(base_name: str, config: ModelConfig, file_type: str) -> str:
    """`<BaseName>-<SizeLabel>-<Type>.gguf`, the GGUF naming convention."""
    return f"{base_name}-{size_label(config)}-{file_type.upper()}{GGUF_SUFFIX}"


def write_gguf(ckpt_path: str | os.PathLike[str], out_path: str | os.PathLike[str], qtype: str,
               *, tokenizer_path: str | os.PathLike[str] | None = None, device: str = "cpu",
               base_name: str | None = None, pre: str | None = None) -> GgufExport:
    """Export a weights APR to GGUF with file type `qtype` (Q4_K_M, Q4_K_S, Q6_K, Q8_0, F16, F32).

    `out_path` is the .gguf file, or a folder (any path not ending in .gguf, created if need
    be) to hold `<BaseName>-<SizeLabel>-<Type>.gguf`. The tokenizer keys come from the
    tokenizer's contract (shipkit.tokenizer_contract); `pre` names llama.cpp's pre-tokenizer
    instead of the detected one (an expert's override).
    Raises InputError for a missing/unsupported input, IntegrityError for NaN/Inf weights.
    """
    started = time.perf_counter()
    spec = mix.file_type(qtype)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available (use --device cpu)")
    ckpt_path = Path(ckpt_path)
    checkpoint = read_apr(ckpt_path)
    if "config" not in checkpoint.metadata:
        raise InputError(f"{ckpt_path}: no model config in its metadata (not a weights checkpoint)")
    config = ModelConfig.from_dict(checkpoint.metadata["config"])
    tokenizer_file = find_tokenizer(ckpt_path, tokenizer_path)
    contract = read_contract(tokenizer_file, pre=pre or _recorded_pre(checkpoint.metadata, tokenizer_file),
                             model_config=config.to_dict())
    tokenizer = read_tokenizer(tokenizer_file, config.vocab_size)
    base_name = base_name or _default_base_name(ckpt_path)
    out_path = Path(out_path)
    if out_path.is_dir() or out_path.suffix.lower() != GGUF_SUFFIX:
        out_path = out_path / default_file_name(base_name, config, spec.name)

    writer = gguf.GGUFWriter(None, gguf_architecture(config))
    _add_metadata(writer, config, spec, base_name)
    add_tokenizer(writer, tokenizer, contract, architecture=config.architecture)
    add_source_metadata(writer, checkpoint.metadata.get("producer", {}).get("source") or {})
    plan = [*derived_tensors(config),
            *(plan_tensor(name, tensor, config, spec) for name, tensor in checkpoint.tensors.items())]
    payloads = encode_tensors(plan, device)
    for (target, values, ggml_type), payload in zip(plan, payloads):
        raw_dtype = ggml_type if ggml_type not in (QType.F32, QType.F16) else None
        writer.add_tensor(target, payload, raw_dtype=raw_dtype)
    counts = Counter(ggml_type.name for _, _, ggml_type in plan)
    weights = sum(values.numel() for _, values, _ in plan)
    _write_atomically(writer, out_path)
    return GgufExport(path=out_path, file_type=spec.name, architecture=config.architecture,
                      tensor_count=sum(counts.values()), weights=weights,
                      nbytes=out_path.stat().st_size, seconds=time.perf_counter() - started,
                      tensor_types=dict(sorted(counts.items())))


def plan_tensor(name: str, tensor: torch.Tensor, config: ModelConfig, spec: mix.FileType
                    ) -> tuple[str, torch.Tensor, QType]:
    """(GGUF name, float32 values in llama.cpp's layout, GGML type) of one checkpoint tensor."""
    target = gguf_name(name)
    if target is None:
        raise InputError(f"tensor {name}: no GGUF equivalent for architecture {config.architecture}")
    values = _float32(name, tensor)
    heads = rope_heads(name, config)
    if heads is not None:
        values = to_interleaved(values, heads)
    ggml_type = mix.tensor_type(target, tuple(values.shape), spec, n_layers=config.num_hidden_layers,
                                tied=config.tie_word_embeddings)
    return target, values, ggml_type


def derived_tensors(config: ModelConfig) -> list[tuple[str, torch.Tensor, QType]]:
    """Tensors llama.cpp needs that the checkpoint does not hold, first in the file as llama.cpp's
    converter writes them: rope_freqs.weight (F32) for llama3 RoPE."""
    if config.rope_scaling is None:
        return []
    factors = rope_freq_factors(config.head_dim, config.rope_theta, config.rope_scaling)
    return [(ROPE_FREQS, factors, QType.F32)]


def encode_tensors(plan: list[tuple[str, torch.Tensor, QType]], device: str) -> list[np.ndarray]:
    """Payloads in plan order; the quantized tensors of each type in one `quantize_many`."""
    payloads: list[np.ndarray | None] = [None] * len(plan)
    by_type: dict[QType, list[int]] = {}
    for index, (_, values, ggml_type) in enumerate(plan):
        if ggml_type in (QType.F32, QType.F16):
            payloads[index] = _float_payload(values, ggml_type)
        else:
            by_type.setdefault(ggml_type, []).append(index)
    for ggml_type, indices in by_type.items():
        encoded = kquants.quantize_many([plan[i][1] for i in indices], ggml_type, device=device)
        for index, blocks in zip(indices, encoded):
            payloads[index] = blocks.reshape(plan[index][1].shape[0], -1)
    return payloads


def _recorded_pre(metadata: dict[str, Any], tokenizer_file: Path) -> str | None:
    """The pre-tokenizer name import recorded (`--pre` there), if this is the tokenizer it was for."""
    recorded = metadata.get("tokenizer") or {}
    if recorded.get("pre") and recorded.get("sha256") == sha256_file(tokenizer_file):
        return recorded["pre"]
    return None


def _default_base_name(ckpt_path: Path) -> str:
    """The run folder's name for RUN_DIR/ckpt/x.apr, else the checkpoint's stem."""
    folder = ckpt_path.resolve().parent
    return folder.parent.name if folder.name == "ckpt" else ckpt_path.stem


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


def _write_atomically(writer: gguf.GGUFWriter, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer.write_header_to_file(path=temporary)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)
        raise
