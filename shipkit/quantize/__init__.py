"""GGUF export and quantization with llama-quantize's bytes, with or without an imatrix.

`kquants.quantize` is the entry for every type; it runs `torch_quants` (torch, CPU or CUDA),
`kquant_rows` (the k-quants in C) or `row_quants` (the legacy, IQ4 and float types). `formats`
holds block layouts and constants, `reference` plain per-block quantizers mirroring
ggml-quants.c, `mix` llama.cpp's per-tensor type choice, `gguf_export` the writer, `gguf_load`
the reader and `dequant` the dequantizers (gguf-py's). Spec and usage: docs/quantize.md.
"""

from shipkit.quantize.gguf_export import GgufExport, default_file_name, write_gguf
from shipkit.quantize.gguf_load import load_gguf_model

__all__ = ["GgufExport", "default_file_name", "load_gguf_model", "write_gguf"]
