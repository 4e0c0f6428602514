"""GGUF export and llama.cpp-exact quantization (Q4_K_M, Q4_K_S, Q6_K, Q8_0, F16, F32).

`formats` holds block layouts and constants, `reference` plain per-block quantizers that
mirror ggml-quants.c, `kquants` the vectorised torch quantizers (CPU or CUDA, same bytes),
`dequant` the dequantizers, `mix` llama.cpp's per-tensor type choice, `gguf_export` the
writer and `gguf_load` the reader. Spec and usage: docs/quantize.md.
"""

from shipkit.quantize.gguf_export import GgufExport, default_file_name, write_gguf
from shipkit.quantize.gguf_load import load_gguf_model

__all__ = ["GgufExport", "default_file_name", "load_gguf_model", "write_gguf"]
