"""shipkit's torch decoder as a parity engine: a base and its quants run over every window at
once, one layer at a time (the base's forward shared by every quant), so it holds about two
layers (plus the LM heads and the activations), never a whole model, on the CPU as on CUDA.
Every tensor's error against the base is measured while its layer is loaded."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shipkit.config import (
    EMBEDDING_WEIGHT,
    FINAL_NORM_WEIGHT,
    LAYER_PREFIX,
    LM_HEAD_WEIGHT,
    ModelConfig,
)
from shipkit.model import RMSNorm, decoder_layer, final_norm, rope_tables
from shipkit.parity.diagnosis import blockwise_rel_rmse, rel_rmse
from shipkit.parity.inputs import (
    LOGIT_BUDGET_BYTES,
    Windows,
    eval_batches,
    scored_targets,
)
from shipkit.parity.metrics import EngineResult, layer_cosine_sums, position_stats
from shipkit.parity.options import TORCH
from shipkit.parity.weights import LoadedModel, ModelWeights

# Bytes of one layer's intermediate activations (q/k/v, attention, the MLP's gate and up) per pass
# over a chunk of windows; the residual streams of every window are held whole beside them.
ACTIVATION_BUDGET_BYTES = {"cuda": 8 << 30, "cpu": 256 << 20}
# mallopt's parameter (glibc malloc.h) and the size from which every block is its own mapping:
# 1 MiB, far below the engine's tensors and far above Python's small objects.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
# Values of a head (or an untied embedding) read per block where it is not kept whole (16 MiB as
# float32): a block per pass keeps a 1.5B model's CPU parity under 2.5 GiB.
HEAD_BLOCK_VALUES = 1 << 22


class StreamedModel:
    """One model run a layer at a time on `device`: its weights stay in the file until the
    layer that uses them runs (`run_trunk`)."""

    def __init__(self, model: LoadedModel, device: torch.device) -> None:
        self.weights: ModelWeights = model.weights
        self.config, self.device = model.config, device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, d), reading the embedding rows of the ids present only."""
        present, inverse = torch.unique(ids, return_inverse=True)
        return self.weights.rows(EMBEDDING_WEIGHT, present, self.device)[inverse]

    def layer_weights(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s weights (full names), float32 on the device."""
        prefix = LAYER_PREFIX.format(index=index)
        return {name: self.weights.load(name, self.device) for name in self.weights.shapes if name.startswith(prefix)}

    def norm(self) -> RMSNorm:
        return final_norm(self.config, self.weights.load(FINAL_NORM_WEIGHT, self.device))

    @property
    def head_name(self) -> str:
        return EMBEDDING_WEIGHT if self.config.tie_word_embeddings else LM_HEAD_WEIGHT

    def head(self) -> StreamedHead:
        return StreamedHead(self.weights, self.head_name, self.device)


class StreamedHead:
    """A model's LM head, float32 on the device: kept whole where reading it again would cost a
    dequantization (a GGUF) or where the device has room (CUDA), else read a block of vocabulary
    rows per use (a mapped checkpoint on the CPU: no copy for F32, a block converted for bf16)."""

    def __init__(self, weights: ModelWeights, name: str, device: torch.device) -> None:
        self.weights, self.name, self.device = weights, name, device
        self.vocab, width = weights.shapes[name]
        self.block_rows = max(1, HEAD_BLOCK_VALUES // width)
        self._whole: torch.Tensor | None = None
        if device.type == "cuda" or not weights.cheap_rows:
            whole = torch.empty(weights.shapes[name], device=device)
            for start in range(0, self.vocab, self.block_rows):
                whole[start:start + self.block_rows] = self._read(start)
            self._whole = whole

    def block(self, start: int) -> torch.Tensor:
        """Rows `start` .. `start + block_rows` of the head."""
        return self._whole[start:start + self.block_rows] if self._whole is not None else self._read(start)

    def _read(self, start: int) -> torch.Tensor:
        return self.weights.rows(self.name, slice(start, start + self.block_rows), self.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) final normed states -> (N, V) float32 logits."""
        if self._whole is not None:
            return F.linear(hidden, self._whole)
        logits = torch.empty(len(hidden), self.vocab, device=self.device)
        for start in range(0, self.vocab, self.block_rows):
            logits[:, start:start + self.block_rows] = F.linear(hidden, self.block(start))
        return logits


@dataclass
class Trunk:
    """What `run_trunk` leaves: per model the final normed states at the scored positions
    ((windows · scored positions, d)), and for each model after the first (a quant of the first)
    its per-layer cosine sums over those positions against the first and every layer tensor's
    rel_rmse against the first's."""

    finals: list[torch.Tensor]
    cosine_sums: list[np.ndarray]
    errors: list[dict[str, float]]


@torch.inference_mode()
def run_trunk(models: list[StreamedModel], windows: Windows) -> Trunk:
    """Every window through the embedding and each decoder layer of a base model and any number
    of its quants, a layer at a time: the base's layer runs once for all of them; each quant's
    layer is then loaded, compared tensor by tensor with the base's, run over the windows a chunk
    at a time and freed, so at most two layers' weights are held at once."""
    config, device = models[0].config, models[0].device
    ids = torch.from_numpy(windows.tokens).to(device)
    cos, sin = rope_tables(config, windows.ctx, device)
    states = [model.embed(ids) for model in models]  # each (n_windows, T, d)
    step = _windows_per_pass(config, windows.ctx, device)
    scored = slice(windows.score_start, windows.ctx - 1)
    cosine_sums: list[list[float]] = [[] for _ in models[1:]]
    errors: list[dict[str, float]] = [{} for _ in models[1:]]
    for index in range(config.num_hidden_layers):
        prefix = LAYER_PREFIX.format(index=index)
        base_weights = models[0].layer_weights(index)
        _run_layer(config, base_weights, prefix, states[0], step, cos, sin)
        for model, x, sums, model_errors in zip(models[1:], states[1:], cosine_sums, errors):
            weights = model.layer_weights(index)
            model_errors |= {name: rel_rmse(weights[name], base_weights[name]) for name in base_weights}
            _run_layer(config, weights, prefix, x, step, cos, sin)
            del weights  # one quant layer at a time beside the base's
            sums.append(sum(layer_cosine_sums([states[0][start:start + step, scored]], [x[start:start + step, scored]])[0]
                            for start in range(0, len(ids), step)))
        del base_weights
    finals = [model.norm()(x[:, scored]).reshape(-1, config.hidden_size) for model, x in zip(models, states)]
    return Trunk(finals, [np.array(sums) for sums in cosine_sums], errors)


def _run_layer(config: ModelConfig, weights: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, step: int,
               cos: torch.Tensor, sin: torch.Tensor) -> None:
    """One decoder layer over the residual streams `x` (n_windows, T, d), in place, `step`
    windows at a time."""
    layer = decoder_layer(config, {name.removeprefix(prefix): weight for name, weight in weights.items()})
    for start in range(0, len(x), step):
        x[start:start + step] = layer(x[start:start + step], cos, sin)


def _windows_per_pass(config: ModelConfig, ctx: int, device: torch.device) -> int:
    """Windows a layer runs at once within `ACTIVATION_BUDGET_BYTES`: per window, float32 q/k/v,
    the MLP's gate, up and product, and the attention scores."""
    projections = config.attention_size + 2 * config.num_key_value_heads * config.head_dim
    per_window = 4 * ctx * (projections + 3 * config.intermediate_size + 2 * config.hidden_size
                            + config.num_attention_heads * ctx)
    return max(1, ACTIVATION_BUDGET_BYTES[device.type] // per_window)


@torch.inference_mode()
def scored_logits(model: LoadedModel, windows: Windows, device: torch.device) -> torch.Tensor:
    """One model's float32 logits at the scored positions of `windows`, (windows · P, V), on
    the CPU, streamed layer by layer."""
    streamed = StreamedModel(model, device)
    final = run_trunk([streamed], windows).finals[0]
    return streamed.head().logits(final).cpu()


class TorchEngine:
    """A base model and its quants as shipkit decoders on `device`, streamed layer by layer over
    every window (`run_trunk`: the base's forward is shared by every quant), then scored through
    the LM heads batch by batch: it holds about two layers, the heads and each model's
    activations, never a whole model, on the CPU as on CUDA. Every quant tensor's rel_rmse is
    measured while its layer is loaded (`tensor_errors`). `results[i]` and `tensor_errors[i]`
    belong to the i-th of [quant, *extra_quants]."""

    def __init__(self, base: LoadedModel, quant: LoadedModel, device: torch.device, *,
                 extra_quants: Sequence[LoadedModel] = ()) -> None:
        _map_large_blocks()
        self.device = device
        self.models = [StreamedModel(model, device) for model in (base, quant, *extra_quants)]
        self.results = [EngineResult(TORCH, str(device)) for _ in self.models[1:]]
        self.tensor_errors: list[dict[str, float]] = [{} for _ in self.models[1:]]

    def steps(self, windows: Windows, *, keep_base_logits: bool = False) -> Iterator[torch.Tensor | None]:
        """Score every window: the trunk first, then per batch of `eval_batches` the heads and
        the metrics. Yields per batch the base model's scored logits on the CPU when
        `keep_base_logits` (for the engine agreement), else None."""
        started = time.perf_counter()
        with torch.inference_mode():
            trunk = run_trunk(self.models, windows)
            heads = [model.head() for model in self.models]
            outer = _outer_errors(self.models, heads)
            self.tensor_errors = [{**layers, **rest} for layers, rest in zip(trunk.errors, outer)]
        positions = len(windows.tokens) * windows.positions_per_window
        for result, sums in zip(self.results, trunk.cosine_sums):
            result.add_cosines(sums, positions)
        self._add_seconds(time.perf_counter() - started)
        per_window, first = windows.positions_per_window, 0
        for batch in eval_batches(windows, self.models[0].config.vocab_size, self.device):
            started = time.perf_counter()
            rows = slice(first * per_window, (first + len(batch)) * per_window)
            targets = scored_targets(batch, windows).to(self.device).reshape(-1)
            base_scored = self._score(heads, [final[rows] for final in trunk.finals], targets, keep_base_logits)
            first += len(batch)
            self._add_seconds(time.perf_counter() - started)
            yield base_scored

    def _add_seconds(self, seconds: float) -> None:
        """The engine's time is shared: every quant's result counts all of it."""
        for result in self.results:
            result.seconds += seconds

    @torch.inference_mode()
    def _score(self, heads: list[StreamedHead], finals: list[torch.Tensor], targets: torch.Tensor,
               keep_base_logits: bool) -> torch.Tensor | None:
        """The base's logits once and each quant's against them, and the metrics,
        `LOGIT_BUDGET_BYTES` of positions at a time."""
        step = max(1, LOGIT_BUDGET_BYTES[self.device.type] // (heads[0].vocab * 4))
        kept = []
        for start in range(0, len(targets), step):
            positions = slice(start, start + step)
            base_logits = heads[0].logits(finals[0][positions])
            for head, final, result in zip(heads[1:], finals[1:], self.results):
                result.parts.append(position_stats(base_logits, head.logits(final[positions]), targets[positions]))
            if keep_base_logits:
                kept.append(base_logits.cpu())
        return torch.cat(kept) if keep_base_logits else None


def _map_large_blocks() -> None:
    """Make glibc give every block of `MMAP_THRESHOLD_BYTES` or more its own mapping, returned to
    the system when freed. Its default threshold rises with each large block freed, after which
    such blocks stay in the heap: the engine's phases (layers, then heads, then metrics) would add
    up in memory instead of each replacing the last. A no-op off glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _outer_errors(models: list[StreamedModel], heads: list[StreamedHead]) -> list[dict[str, float]]:
    """Per quant (each model after the first), rel_rmse of the tensors outside the layers (final
    norm, LM head, an untied embedding) against the base's, the big ones a block of rows at a time."""
    base, base_head = models[0], heads[0]
    base_norm = base.weights.load(FINAL_NORM_WEIGHT, base.device)
    vocab, width = base.weights.shapes[EMBEDDING_WEIGHT]
    block_rows = max(1, HEAD_BLOCK_VALUES // width)

    def embedding_rows(model: StreamedModel) -> Callable[[int], torch.Tensor]:
        return lambda start: model.weights.rows(EMBEDDING_WEIGHT, slice(start, start + block_rows), model.device)

    all_errors = []
    for quant, head in zip(models[1:], heads[1:]):
        errors = {FINAL_NORM_WEIGHT: rel_rmse(quant.weights.load(FINAL_NORM_WEIGHT, quant.device), base_norm),
                  base.head_name: blockwise_rel_rmse(head.block, base_head.block, base_head.vocab, base_head.block_rows)}
        if base.head_name != EMBEDDING_WEIGHT:
            errors[EMBEDDING_WEIGHT] = blockwise_rel_rmse(embedding_rows(quant), embedding_rows(base), vocab, block_rows)
        all_errors.append(errors)
    return all_errors
