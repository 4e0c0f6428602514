"""Helpers for the quantize tests: tiny random checkpoints and llama.cpp's own quantizer."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from shipkit.apr import write_apr
from shipkit.config import ModelConfig
from shipkit.model import CausalLM
from shipkit.quantize.mix import FILE_TYPES


def write_random_checkpoint(path: Path, config: ModelConfig, *, seed: int = 0) -> CausalLM:
    """A CausalLM with random weights (norms and biases perturbed too) saved as a weights APR."""
    torch.manual_seed(seed)
    model = CausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.05)
    metadata = {
        "kind": "weights",
        "config": config.to_dict(),
        "tokenizer": {"file": "tokenizer.json", "sha256": ""},
        "producer": {"shipkit_version": "test", "run_id": "quant-test", "epoch": 0, "step": 0},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_apr(path, model.weights(), metadata)
    return model


def llama_cpp_quantize(source: Path, target: Path, file_type: str, *, threads: int = 2) -> None:
    """Quantize a GGUF with llama.cpp's llama_model_quantize (no imatrix)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = int(FILE_TYPES[file_type].ftype)
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                            ctypes.byref(params))
    assert status == 0, f"llama_model_quantize failed on {source}"


def gguf_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    """tensor name -> (GGML type name, raw bytes)."""
    reader = gguf.GGUFReader(path)
    return {tensor.name: (gguf.GGMLQuantizationType(tensor.tensor_type).name,
                          np.ascontiguousarray(tensor.data).tobytes())
            for tensor in reader.tensors}


class GgmlTypeTraits(ctypes.Structure):
    """ggml.h's struct ggml_type_traits."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


GGML_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """llama-cpp-python's libggml-base: ggml's own quantizers and dequantizers."""
    import llama_cpp

    library = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p]
    library.ggml_get_type_traits.restype = ctypes.POINTER(GgmlTypeTraits)
    library.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return library


def ggml_quantize_rows(rows: np.ndarray, qtype: gguf.GGMLQuantizationType,
                       importance: np.ndarray | None = None) -> bytes:
    """ggml_quantize_chunk over whole rows (n_rows, n_cols), with the importance vector (n_cols,)
    that llama-quantize would pass for the tensor, or none."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    out = np.zeros(rows.size * 4, dtype=np.uint8)
    size = ggml_base().ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0,
                                           rows.shape[0], rows.shape[1],
                                           None if weights is None else weights.ctypes.data)
    return out[:size].tobytes()


def ggml_quantize(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> bytes:
    """Blocks from ggml's own reference quantizer, rows of 256 values."""
    return ggml_quantize_rows(np.asarray(values, dtype=np.float32).reshape(-1, 256), qtype)


def ggml_dequantize(data: bytes | np.ndarray, qtype: gguf.GGMLQuantizationType, count: int
                    ) -> np.ndarray:
    """`count` float32 values from ggml's own dequantizer (the type traits' to_float)."""
    source = np.frombuffer(bytes(data), dtype=np.uint8)
    out = np.empty(count, dtype=np.float32)
    to_float = ggml_base().ggml_get_type_traits(int(qtype)).contents.to_float
    GGML_TO_FLOAT(to_float)(source.ctypes.data, out.ctypes.data, count)
    return out
