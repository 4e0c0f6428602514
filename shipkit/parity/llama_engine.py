"""llama.cpp as a parity engine: the base GGUF and its quants loaded side by side, each window run
through the base once and through every quant from an empty cache, and scored at the same
positions as the torch engine."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shipkit.parity.inputs import Windows
from shipkit.parity.llama_runtime import LlamaCppModel
from shipkit.parity.metrics import EngineResult, layer_cosine_sums, position_stats
from shipkit.parity.options import LLAMA_CPP


class LlamaCppEngine:
    """A base GGUF and its quants in llama.cpp, window by window. `results[i]` belongs to the
    i-th of [quant_gguf, *extra_quants]."""

    def __init__(self, base_gguf: Path, quant_gguf: Path, ctx: int, threads: int, *,
                 extra_quants: Sequence[Path] = ()) -> None:
        self.base = LlamaCppModel(base_gguf, ctx, threads)
        self.quants: list[LlamaCppModel] = []
        try:
            for path in (quant_gguf, *extra_quants):
                self.quants.append(LlamaCppModel(path, ctx, threads))
        except BaseException:
            self.close()
            raise
        self.results = [EngineResult(LLAMA_CPP, "cpu") for _ in self.quants]

    def step(self, batch: np.ndarray, windows: Windows) -> torch.Tensor:
        """Score one batch of windows; returns the base model's scored logits."""
        started = time.perf_counter()
        scored = slice(windows.score_start, windows.ctx - 1)
        base_scored = []
        for window in batch:
            base_logits, base_layers = self.base.run(window)
            targets = torch.from_numpy(window[windows.score_start + 1 :])
            for quant, result in zip(self.quants, self.results):
                quant_logits, quant_layers = quant.run(window)
                result.parts.append(position_stats(base_logits[scored], quant_logits[scored], targets))
                if base_layers and quant_layers:
                    sums = layer_cosine_sums([s[scored] for s in base_layers], [s[scored] for s in quant_layers])
                    result.add_cosines(sums, windows.positions_per_window)
            base_scored.append(base_logits[scored])
        seconds = time.perf_counter() - started
        for result in self.results:  # shared, as the base's runs are
            result.seconds += seconds
        return torch.cat(base_scored)

    def close(self) -> None:
        self.base.close()
        for quant in self.quants:
            quant.close()
