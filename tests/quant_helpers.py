"""Helpers for the quantize tests: tiny random checkpoints and llama.cpp's own quantizer."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import torch

from shipkit.apr import write_apr
from shipkit.model import CausalLM, ModelConfig
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


def ggml_quantize(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> bytes:
    """Blocks from ggml's own reference quantizer (ggml_quantize_chunk in libggml-base)."""
    import os

    import llama_cpp

    library = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p]
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    out = np.zeros(flat.size * 4, dtype=np.uint8)
    size = library.ggml_quantize_chunk(int(qtype), flat.ctypes.data, out.ctypes.data, 0,
                                       flat.size // 256, 256, None)
    return out[:size].tobytes()
