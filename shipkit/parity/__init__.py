"""The parity gate: does the quantized GGUF behave like the model it was made from?

Over held-out val tokens, in windows of `ctx` tokens, both models predict every position; the
second half of each window is scored the way `llama-perplexity --kl-divergence` scores it
(the first half is context). Two engines run the comparison: shipkit's torch forward on
weights dequantized from the GGUF bytes, and llama.cpp on the GGUF files themselves. The same
F32 model must also give the same predictions in both engines (engine agreement), and every
dequantized tensor is compared with the base weights, so a failure can name its cause. Several
GGUFs of one model (a quant ladder) are scored in one run sharing the base model's forward, each
judged under its file type's band.
Field-by-field meaning of the evidence: docs/parity.md.

One job per file:
- `options`: `ParityOptions` (what a run compares and how), the engine names, the defaults.
- `inputs`: the val windows, which positions are scored against which tokens, the batches.
- `weights`: a checkpoint or GGUF as float32 tensors by HF name, read (dequantized) on demand.
- `metrics`: KL, top-1, PPL and Δp per position, their summary, checks against thresholds.
- `torch_engine`: base and quants as shipkit decoders, streamed a layer at a time.
- `llama_runtime`: llama.cpp through llama-cpp-python (a GGUF's vocabulary, or its logits and
  layer outputs).
- `llama_engine`: base and quant GGUFs in llama.cpp, window by window.
- `diagnosis`: each tensor's error against the base, and a flagged tensor's likely cause.
- `gguf_facts`: what each scored GGUF is: file type, bits per weight, imatrix, tokenizer keys.
- `tokenizer`: the text side: llama.cpp's tokens, BOS/EOS and chat template against HF's.
- `chat_template`: one conversation rendered by transformers, by llama.cpp's jinja path and by
  its builtin engine.
- `gate`: the measurements judged against the contract, as parity.json.
- `run`: `run_parity`, which loads, checks, measures, gates and writes the evidence.
"""

from __future__ import annotations

import importlib
from typing import Any

# Name -> the module defining it. Loaded on first use: `run` pulls in torch, which a caller
# wanting only the options (the CLI building its --help) should not pay for.
_EXPORTS = {"ParityOptions": "options", "TORCH": "options", "LLAMA_CPP": "options", "run_parity": "run"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
