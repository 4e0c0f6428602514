"""The importance matrix stage: which input columns of each weight matrix carry the model's
activations, measured on the train split and written as llama.cpp's GGUF imatrix, so
`llama-quantize --imatrix` and `shipkit quantize --imatrix` spend their precision there.

One job per file (spec: docs/imatrix.md):
- `options`: the defaults and bounds of a run (import-free, for the CLI).
- `format`: the file formats' constants and the calibration record.
- `collect`: `compute_imatrix`: the train chunks, the model run with its hooks, the result.
- `writer`: the GGUF imatrix file, written atomically.
- `reader`: `load_imatrix` (shipkit's, llama-imatrix's GGUF or legacy .dat file, checked) and
  `ImportanceMatrix` with `check_model` / `check_not_val`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Name -> the module defining it. Loaded on first use: `collect` pulls in torch and `reader`
# gguf, which a caller wanting only the options (the CLI building its --help) should not pay for.
_EXPORTS = {
    "Calibration": "format", "split_sha256": "format",
    "ImatrixResult": "collect", "calibration_chunks": "collect", "column_sums": "collect",
    "compute_imatrix": "collect",
    "ImportanceMatrix": "reader", "load_imatrix": "reader",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
