"""The parity gate: does the quantized GGUF behave like the model it was made from?

Over held-out val tokens, in windows of `ctx` tokens, both models predict every position; the
second half of each window is scored the way `llama-perplexity --kl-divergence` scores it
(the first half is context). Two engines run the comparison: shipkit's torch forward on
weights dequantized from the GGUF bytes, and llama.cpp on the GGUF files themselves. The same
F32 model must also give the same predictions in both engines (engine agreement), and every
dequantized tensor is compared with the base weights, so a failure can name its cause.
The torch engine streams both models layer by layer over all windows at once, so it holds
about one layer of each (plus the LM heads and the activations), never a whole model.
Field-by-field meaning of the evidence: docs/parity.md.
"""

from __future__ import annotations

import abc
import ctypes
import itertools
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from shipkit import __version__, quantize
from shipkit.apr import read_apr
from shipkit.contract import Contract, Threshold, load_contract
from shipkit.errors import InputError, IntegrityError
from shipkit.evidence import write_evidence
from shipkit.fsutil import sha256_file
from shipkit.llama_runtime import bindings
from shipkit.model import (
    EMBEDDING_WEIGHT,
    FINAL_NORM_WEIGHT,
    LAYER_PREFIX,
    LM_HEAD_WEIGHT,
    ModelConfig,
    RMSNorm,
    decoder_layer,
    final_norm,
    parameter_count,
    rope_tables,
)
from shipkit.quantize.dequant import dequantize
from shipkit.quantize.formats import QType
from shipkit.quantize.gguf_load import gguf_config, model_tensors, open_gguf
from shipkit.quantize.tensor_names import (
    from_interleaved,
    rope_heads,
)
from shipkit.tokenize import read_tokens
from shipkit.tokenizer_fidelity import (
    DEFAULT_TOKEN_BUDGET,
    check_tokenizer,
    skipped_section,
)

SCHEMA_VERSION = 1
PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
TORCH, LLAMA_CPP = "torch", "llama.cpp"
CPU = torch.device("cpu")
# Bytes of float32 logits one model's head computes per pass (both models' at once); the metrics'
# float64 softmax temporaries take about 8x this, so on the CPU a 1.5B model's parity stays
# under 2.5 GiB.
LOGIT_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}
# Bytes of one layer's intermediate activations (q/k/v, attention, the MLP's gate and up) per pass
# over a chunk of windows; the residual streams of every window are held whole beside them.
ACTIVATION_BUDGET_BYTES = {"cuda": 8 << 30, "cpu": 256 << 20}
# Values a GGUF tensor is dequantized in per block: blocks that fit the cache dequantized a
# 58M-weight Q4_K tensor 7x faster than one call on the whole tensor here (2 cores, numpy).
DEQUANT_BLOCK_VALUES = 1 << 18
# Values compared per block in float64 (32 MiB a copy): small next to one layer of a 7B model.
COMPARE_BLOCK_VALUES = 1 << 22
# mallopt's parameter (glibc malloc.h) and the size from which every block is its own mapping:
# 1 MiB, far below the engine's tensors and far above Python's small objects.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
# Values of a head (or an untied embedding) read per block where it is not kept whole (16 MiB as
# float32): a block per pass keeps a 1.5B model's CPU parity under 2.5 GiB.
HEAD_BLOCK_VALUES = 1 << 22
# Windows the torch engine re-runs on the base GGUF to tell which side of a failed engine
# agreement is wrong; a handful suffices, a conversion bug shows on every window.
SIDE_PROBE_WINDOWS = 4
# A flagged tensor "holds" another tensor's weights (a swap) or its own weights with Q/K rows
# permuted when its error against that candidate is this small.
MATCH_REL_RMSE = 0.5
# llama.cpp's name for the residual stream after layer N (llama-graph: `cb(cur, "l_out", il)`).
LAYER_OUTPUT_PREFIX = "l_out-"
GGML_TYPE_F32 = 0  # enum ggml_type
# Config fields a GGUF takes from the tokenizer's contract, not from config.json (Llama 3.1's
# config.json lists three EOS ids, its tokenizer names <|eot_id|>): they do not change the logits.
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id")
NO_LAYERS_NOTE = "this llama.cpp build named no l_out-N tensors, so no per-layer cosine"


# ---------------------------------------------------------------------------------------------
# Metrics (pure)


@dataclass
class PositionStats:
    """Per scored position: KL(base‖quant) in nats, whether the top-1 tokens agree, both
    models' NLL of the true next token, and Δp = p_quant(true) − p_base(true)."""

    kl: np.ndarray
    same_top: np.ndarray
    base_nll: np.ndarray
    quant_nll: np.ndarray
    dp: np.ndarray

    @classmethod
    def concat(cls, parts: list[PositionStats]) -> PositionStats:
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in cls.__dataclass_fields__})


def position_stats(base_logits: torch.Tensor, quant_logits: torch.Tensor, targets: torch.Tensor) -> PositionStats:
    """(N, V) logits of both models and the (N,) true next tokens -> per-position stats,
    computed in float64."""
    base_logp = torch.log_softmax(base_logits.double(), dim=-1)
    quant_logp = torch.log_softmax(quant_logits.double(), dim=-1)
    kl = (base_logp.exp() * (base_logp - quant_logp)).sum(-1)
    same_top = base_logits.argmax(-1) == quant_logits.argmax(-1)
    index = targets.long().unsqueeze(-1)
    base_true = base_logp.gather(-1, index).squeeze(-1)
    quant_true = quant_logp.gather(-1, index).squeeze(-1)
    return PositionStats(
        kl=kl.cpu().numpy(),
        same_top=same_top.cpu().numpy(),
        base_nll=(-base_true).cpu().numpy(),
        quant_nll=(-quant_true).cpu().numpy(),
        dp=(quant_true.exp() - base_true.exp()).cpu().numpy(),
    )


def summarize(stats: PositionStats) -> dict[str, float | None]:
    """The llama-perplexity KL-divergence summary; `None` where a value is not finite."""
    metrics = {
        "kl_mean": float(stats.kl.mean()),
        "kl_p99": float(np.percentile(stats.kl, 99)),
        "kl_max": float(stats.kl.max()),
        "same_top_pct": 100.0 * float(stats.same_top.mean()),
        "ppl_base": _exp(float(stats.base_nll.mean())),
        "ppl_quant": _exp(float(stats.quant_nll.mean())),
        "ppl_ratio": _exp(float(stats.quant_nll.mean() - stats.base_nll.mean())),
        "rms_dp_pct": 100.0 * math.sqrt(float(np.mean(stats.dp**2))),
        "max_abs_dp_pct": 100.0 * float(np.abs(stats.dp).max()),
    }
    return {name: value if math.isfinite(value) else None for name, value in metrics.items()}


def _exp(value: float) -> float:
    """exp that overflows to inf instead of raising."""
    return math.exp(value) if value < 700.0 else math.inf


def agreement_metrics(stats: PositionStats) -> dict[str, float | None]:
    """Engine agreement on the same model: top-1 identical %, mean and max KL."""
    summary = summarize(stats)
    return {"top1_pct": summary["same_top_pct"], "kl_mean": summary["kl_mean"], "kl_max": summary["kl_max"]}


def layer_cosine_sums(base_states: list[torch.Tensor], quant_states: list[torch.Tensor]) -> np.ndarray:
    """Per layer, the sum over positions of the cosine similarity of the two models'
    residual-stream vectors (each list: one (..., d) tensor per layer)."""
    return np.array(
        [
            torch.nn.functional.cosine_similarity(b.double(), q.double(), dim=-1).sum().item()
            for b, q in zip(base_states, quant_states, strict=True)
        ]
    )


def check(value: float | None, threshold: Threshold) -> dict[str, Any]:
    return {"value": value, **threshold.to_dict(), "verdict": PASS if threshold.passes(value) else FAIL}


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Windows:
    """The evaluated val tokens: `tokens` (n_windows, ctx); logits at positions
    `[score_start, ctx - 1)` are scored against the token that follows each."""

    tokens: np.ndarray
    tokenizer_sha256: str

    @property
    def ctx(self) -> int:
        return self.tokens.shape[1]

    @property
    def score_start(self) -> int:
        return self.ctx // 2

    @property
    def positions_per_window(self) -> int:
        return self.ctx - 1 - self.score_start


def eval_windows(tokens_dir: str | Path, n_tokens: int, ctx: int) -> Windows:
    """The first `n_tokens` (rounded down to whole windows) of the val split, as windows.

    Raises InputError if the split holds fewer than `ctx` tokens or `ctx` is below 4.
    """
    if ctx < 4:
        raise InputError(f"--ctx {ctx}: must be at least 4 (half of each window is context)")
    split = read_tokens(tokens_dir, "val")
    n_windows = min(n_tokens, split.total_tokens) // ctx
    if n_windows == 0:
        raise InputError(
            f"{tokens_dir}: the val split has {split.total_tokens} tokens and --n-tokens is {n_tokens}; "
            f"parity needs at least one window of --ctx {ctx}"
        )
    pieces, remaining = [], n_windows * ctx
    for shard in split.shards:
        pieces.append(np.asarray(shard[:remaining], dtype=np.int64))
        remaining -= len(pieces[-1])
    tokens = np.concatenate(pieces).reshape(n_windows, ctx)
    return Windows(tokens=tokens, tokenizer_sha256=split.tokenizer_sha256)


class ModelWeights(Mapping[str, torch.Tensor], abc.ABC):
    """A model's weights by HF name, as float32 tensors in HF's layout, read from the file each
    time one is asked for and not kept: the mapping costs one tensor at a time, never a model."""

    # Whether reading rows again costs about a copy (a mapped checkpoint), not a dequantization.
    cheap_rows = True

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    @abc.abstractmethod
    def load(self, name: str, device: torch.device = CPU) -> torch.Tensor:
        """The whole tensor, float32 on `device`."""

    @abc.abstractmethod
    def rows(self, name: str, index: slice | torch.Tensor, device: torch.device = CPU) -> torch.Tensor:
        """Rows `index` of a 2-D weight whose rows are stored in HF's order (the embedding, the LM
        head), float32 on `device`."""


class AprWeights(ModelWeights):
    """A checkpoint's tensors as views of its memory map: on the CPU an F32 tensor is the view
    itself (no copy), a bf16 one is converted when asked for; on CUDA the stored bytes travel and
    are converted there."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__({name: tuple(tensor.shape) for name, tensor in tensors.items()})
        self._tensors = tensors

    def load(self, name: str, device: torch.device = CPU) -> torch.Tensor:
        return self._tensors[name].to(device).float()

    def rows(self, name: str, index: slice | torch.Tensor, device: torch.device = CPU) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu()
        return self._tensors[name][index].to(device).float()


class GgufWeights(ModelWeights):
    """A GGUF's tensors dequantized to float32 when asked for, a block of rows at a time on a
    thread pool (numpy releases the GIL), with Q/K rows put back in HF's order (arch llama)."""

    cheap_rows = False

    def __init__(self, reader: gguf.GGUFReader, config: ModelConfig, path: Path) -> None:
        tensors = model_tensors(reader, config, path)
        # ggml lists ne0 (the columns) first
        super().__init__({name: tuple(int(size) for size in reversed(t.shape)) for name, t in tensors.items()})
        self._tensors, self._config = tensors, config

    def load(self, name: str, device: torch.device = CPU) -> torch.Tensor:
        tensor = self._tensors[name]
        values = torch.from_numpy(_dequantized(tensor.data, QType(tensor.tensor_type), self.shapes[name]))
        heads = rope_heads(name, self._config)
        return (values if heads is None else from_interleaved(values, heads)).to(device)

    def rows(self, name: str, index: slice | torch.Tensor, device: torch.device = CPU) -> torch.Tensor:
        tensor = self._tensors[name]
        data = tensor.data[index.cpu().numpy() if isinstance(index, torch.Tensor) else index]
        shape = (len(data), self.shapes[name][1])
        return torch.from_numpy(_dequantized(data, QType(tensor.tensor_type), shape)).to(device)


@cache
def _dequant_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="dequantize")


def _dequantized(data: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF tensor bytes -> a new float32 array of `shape`, dequantized a block of rows at a time
    (row by row the values are those of one `dequantize` call on the whole tensor)."""
    out = np.empty(shape, dtype=np.float32)
    if len(shape) != 2:
        out[...] = dequantize(data, qtype, shape)
        return out
    rows, columns = shape
    step = max(1, DEQUANT_BLOCK_VALUES // max(1, columns))

    def fill(start: int) -> None:
        stop = min(start + step, rows)
        out[start:stop] = dequantize(data[start:stop], qtype, (stop - start, columns))

    list(_dequant_pool().map(fill, range(0, rows, step)))
    return out


@dataclass
class LoadedModel:
    path: Path
    format: str  # "apr" or "gguf"
    config: ModelConfig
    weights: Mapping[str, torch.Tensor]  # a ModelWeights: read when asked for
    tokenizer_sha256: str | None = None


def load_model_file(path: str | Path) -> LoadedModel:
    """An `.apr` weights file or a GGUF, checked and mapped; its weights (float32, HF names) are
    read, and dequantized, only when asked for."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.suffix == ".apr":
        checkpoint = read_apr(path)
        if checkpoint.metadata.get("kind") != "weights" or checkpoint.config is None:
            raise InputError(f"{path}: not a weights checkpoint with a model config (give an epoch or best .apr)")
        tokenizer = checkpoint.metadata.get("tokenizer") or {}
        return LoadedModel(path, "apr", checkpoint.config, AprWeights(checkpoint.tensors), tokenizer.get("sha256"))
    if path.suffix == ".gguf":
        reader = open_gguf(path)
        config = gguf_config(reader, path)
        return LoadedModel(path, "gguf", config, GgufWeights(reader, config, path))
    raise InputError(f"{path}: expected an .apr or .gguf file")


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, e.g. {"Q4_K": 12, "F32": 5}."""
    counts: dict[str, int] = {}
    for tensor in open_gguf(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# Engines


def resolve_device(device: str) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device {device}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


class StreamedModel:
    """One model run a layer at a time on `device`: its weights stay in the file until the
    layer that uses them runs (`run_trunk`)."""

    def __init__(self, model: LoadedModel, device: torch.device) -> None:
        self.weights: ModelWeights = model.weights  # type: ignore[assignment]
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
    ((windows · scored positions, d)), and for two models the per-layer cosine sums over those
    positions and every layer tensor's rel_rmse (second model against the first)."""

    finals: list[torch.Tensor]
    cosine_sums: np.ndarray
    errors: dict[str, float]


@torch.inference_mode()
def run_trunk(models: list[StreamedModel], windows: Windows) -> Trunk:
    """Every window through the embedding and each decoder layer of one or two models, a layer
    at a time: the layer's weights are loaded for every model, compared tensor by tensor (two
    models), run over the windows a chunk at a time and freed before the next layer is read."""
    config, device = models[0].config, models[0].device
    ids = torch.from_numpy(windows.tokens).to(device)
    cos, sin = rope_tables(config, windows.ctx, device)
    states = [model.embed(ids) for model in models]  # each (n_windows, T, d)
    step = _windows_per_pass(config, windows.ctx, device)
    scored = slice(windows.score_start, windows.ctx - 1)
    cosine_sums: list[float] = []
    errors: dict[str, float] = {}
    for index in range(config.num_hidden_layers):
        prefix = LAYER_PREFIX.format(index=index)
        weights = [model.layer_weights(index) for model in models]
        if len(models) == 2:
            errors |= {name: rel_rmse(weights[1][name], weights[0][name]) for name in weights[0]}
        for layer_weights, x in zip(weights, states):
            layer = decoder_layer(config, {name.removeprefix(prefix): w for name, w in layer_weights.items()})
            for start in range(0, len(x), step):
                x[start:start + step] = layer(x[start:start + step], cos, sin)
        del weights, layer_weights, layer  # the layer's weights are not held past it
        if len(models) == 2:
            cosine_sums.append(sum(layer_cosine_sums([states[0][start:start + step, scored]],
                                                     [states[1][start:start + step, scored]])[0]
                                   for start in range(0, len(ids), step)))
    finals = [model.norm()(x[:, scored]).reshape(-1, config.hidden_size) for model, x in zip(models, states)]
    return Trunk(finals, np.array(cosine_sums), errors)


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


class LlamaCppModel:
    """A GGUF in llama.cpp, through llama-cpp-python's C API: the logits of every position and,
    via the graph-evaluation callback, each layer's output (the `l_out-N` tensors)."""

    def __init__(self, path: Path, ctx: int, threads: int) -> None:
        llama = bindings()
        self._api = llama
        self._ggml = _ggml_api()
        self._layers: dict[int, np.ndarray] = {}
        self._callback = llama.ggml_backend_sched_eval_callback(self._on_tensor)  # kept alive here
        model_params = llama.llama_model_default_params()
        # ggml's extra CPU buffer types (AMX tiles, repacked Q4_K/Q8_0 layouts) crash llama_decode
        # on batches of more than one token on AMX machines (llama-cpp-python 0.3.36); the plain
        # CPU kernels compute the same products.
        model_params.use_extra_bufts = False
        self.model = llama.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise IntegrityError(f"{path}: llama.cpp cannot load this GGUF (a conversion bug, or a feature llama.cpp lacks)")
        params = llama.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = ctx
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = GGML_TYPE_F32  # an F16 KV cache would round what torch keeps in float32
        params.cb_eval = self._callback
        self.context = llama.llama_init_from_model(self.model, params)
        if not self.context:
            llama.llama_model_free(self.model)
            raise InputError(f"{path}: llama.cpp cannot create a context of {ctx} tokens for this GGUF")
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))
        self.batch = llama.llama_batch_init(ctx, 0, 1)
        self.path = path

    def _on_tensor(self, tensor: int, ask: bool, _user_data: int) -> bool:
        """Called by ggml for every graph node: first to ask whether we want its data, then,
        for those we said yes to, once it is computed. Must not raise (a C callback)."""
        name = self._ggml.ggml_get_name(tensor).decode(errors="replace")
        if not name.startswith(LAYER_OUTPUT_PREFIX):
            return not ask
        if ask:
            return True
        values = np.empty(self._ggml.ggml_nelements(tensor), dtype=np.float32)
        self._ggml.ggml_backend_tensor_get(tensor, values.ctypes.data, 0, values.nbytes)
        self._layers[int(name[len(LAYER_OUTPUT_PREFIX):])] = values
        return True

    def run(self, window: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(T,) ids, from an empty cache -> (T, V) float32 logits and each layer's output (T, d),
        or None for the layers if llama.cpp named no `l_out-N` tensor."""
        llama, batch, length = self._api, self.batch, len(window)
        batch.n_tokens = length
        for position, token in enumerate(window.tolist()):
            batch.token[position] = token
            batch.pos[position] = position
            batch.n_seq_id[position] = 1
            batch.seq_id[position][0] = 0
            batch.logits[position] = True
        self._layers.clear()
        llama.llama_memory_clear(llama.llama_get_memory(self.context), True)
        status = llama.llama_decode(self.context, batch)
        if status != 0:
            raise IntegrityError(f"{self.path}: llama.cpp failed to evaluate a window (llama_decode returned {status})")
        logits = np.ctypeslib.as_array(llama.llama_get_logits(self.context), shape=(length * self.n_vocab,))
        layers = [torch.from_numpy(self._layers[i].reshape(length, -1)) for i in sorted(self._layers)] or None
        return torch.from_numpy(logits.reshape(length, self.n_vocab).copy()), layers

    def close(self) -> None:
        self._api.llama_batch_free(self.batch)
        self._api.llama_free(self.context)
        self._api.llama_model_free(self.model)


@cache
def _ggml_api() -> ctypes.CDLL:
    """The three ggml C functions the layer callback needs, from llama-cpp-python's libggml-base."""
    import llama_cpp

    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        raise InputError(f"{path}: cannot load ggml from this llama-cpp-python install ({error})") from None
    library.ggml_get_name.restype = ctypes.c_char_p
    library.ggml_get_name.argtypes = [ctypes.c_void_p]
    library.ggml_nelements.restype = ctypes.c_int64
    library.ggml_nelements.argtypes = [ctypes.c_void_p]
    library.ggml_backend_tensor_get.restype = None
    library.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return library


@dataclass
class EngineResult:
    """One engine's comparison of base and quant over all windows."""

    name: str
    device: str
    seconds: float = 0.0
    parts: list[PositionStats] = field(default_factory=list)
    cosine_sums: np.ndarray | None = None
    cosine_count: int = 0

    def add_cosines(self, sums: np.ndarray, count: int) -> None:
        self.cosine_sums = sums if self.cosine_sums is None else self.cosine_sums + sums
        self.cosine_count += count

    def hidden_cosine(self) -> list[float | None] | None:
        """Mean cosine per layer (None for a non-finite one), or None without layer outputs."""
        if self.cosine_sums is None:
            return None
        return [_finite(float(total / self.cosine_count)) for total in self.cosine_sums]


class TorchEngine:
    """Base and quant as shipkit decoders on `device`, streamed layer by layer over every window
    (`run_trunk`), then scored through both LM heads batch by batch: it holds about one layer of
    each model, the two heads and the activations, never a whole model, on the CPU as on CUDA.
    Every tensor's rel_rmse is measured while its layer is loaded (`tensor_errors`)."""

    def __init__(self, base: LoadedModel, quant: LoadedModel, device: torch.device) -> None:
        _map_large_blocks()
        self.device = device
        self.models = [StreamedModel(base, device), StreamedModel(quant, device)]
        self.result = EngineResult(TORCH, str(device))
        self.tensor_errors: dict[str, float] = {}

    def steps(self, windows: Windows, *, keep_base_logits: bool = False) -> Iterator[torch.Tensor | None]:
        """Score every window: the trunk first, then per batch of `eval_batches` the heads and
        the metrics. Yields per batch the base model's scored logits on the CPU when
        `keep_base_logits` (for the engine agreement), else None."""
        started = time.perf_counter()
        with torch.inference_mode():
            trunk = run_trunk(self.models, windows)
            heads = [model.head() for model in self.models]
            self.tensor_errors = {**trunk.errors, **_outer_errors(self.models, heads)}
        self.result.add_cosines(trunk.cosine_sums, len(windows.tokens) * windows.positions_per_window)
        self.result.seconds += time.perf_counter() - started
        per_window, first = windows.positions_per_window, 0
        for batch in eval_batches(windows, self.models[0].config.vocab_size, self.device):
            started = time.perf_counter()
            rows = slice(first * per_window, (first + len(batch)) * per_window)
            targets = _targets(batch, windows).to(self.device).reshape(-1)
            base_scored = self._score(heads, [final[rows] for final in trunk.finals], targets, keep_base_logits)
            first += len(batch)
            self.result.seconds += time.perf_counter() - started
            yield base_scored

    @torch.inference_mode()
    def _score(self, heads: list[StreamedHead], finals: list[torch.Tensor], targets: torch.Tensor,
               keep_base_logits: bool) -> torch.Tensor | None:
        """Both heads' logits and the metrics, `LOGIT_BUDGET_BYTES` of positions at a time."""
        step = max(1, LOGIT_BUDGET_BYTES[self.device.type] // (heads[0].vocab * 4))
        kept = []
        for start in range(0, len(targets), step):
            positions = slice(start, start + step)
            base_logits = heads[0].logits(finals[0][positions])
            quant_logits = heads[1].logits(finals[1][positions])
            self.result.parts.append(position_stats(base_logits, quant_logits, targets[positions]))
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


def _outer_errors(models: list[StreamedModel], heads: list[StreamedHead]) -> dict[str, float]:
    """rel_rmse of the tensors outside the layers (final norm, LM head, an untied embedding),
    the big ones a block of rows at a time."""
    base, quant = models
    errors = {FINAL_NORM_WEIGHT: rel_rmse(quant.weights.load(FINAL_NORM_WEIGHT, quant.device),
                                          base.weights.load(FINAL_NORM_WEIGHT, base.device))}
    errors[base.head_name] = _blockwise_rel_rmse(heads[1].block, heads[0].block, heads[0].vocab, heads[0].block_rows)
    if base.head_name != EMBEDDING_WEIGHT:
        vocab, width = base.weights.shapes[EMBEDDING_WEIGHT]
        block_rows = max(1, HEAD_BLOCK_VALUES // width)

        def embedding_rows(model: StreamedModel) -> Callable[[int], torch.Tensor]:
            return lambda start: model.weights.rows(EMBEDDING_WEIGHT, slice(start, start + block_rows), model.device)

        errors[EMBEDDING_WEIGHT] = _blockwise_rel_rmse(embedding_rows(quant), embedding_rows(base), vocab, block_rows)
    return errors


class LlamaCppEngine:
    """Base and quant GGUFs in llama.cpp, window by window."""

    def __init__(self, base_gguf: Path, quant_gguf: Path, ctx: int, threads: int) -> None:
        self.base = LlamaCppModel(base_gguf, ctx, threads)
        try:
            self.quant = LlamaCppModel(quant_gguf, ctx, threads)
        except BaseException:
            self.base.close()
            raise
        self.result = EngineResult(LLAMA_CPP, "cpu")

    def step(self, batch: np.ndarray, windows: Windows) -> torch.Tensor:
        """Score one batch of windows; returns the base model's scored logits."""
        started = time.perf_counter()
        scored = slice(windows.score_start, windows.ctx - 1)
        base_scored = []
        for window in batch:
            base_logits, base_layers = self.base.run(window)
            quant_logits, quant_layers = self.quant.run(window)
            targets = torch.from_numpy(window[windows.score_start + 1 :])
            self.result.parts.append(position_stats(base_logits[scored], quant_logits[scored], targets))
            if base_layers and quant_layers:
                sums = layer_cosine_sums([s[scored] for s in base_layers], [s[scored] for s in quant_layers])
                self.result.add_cosines(sums, windows.positions_per_window)
            base_scored.append(base_logits[scored])
        self.result.seconds += time.perf_counter() - started
        return torch.cat(base_scored)

    def close(self) -> None:
        self.base.close()
        self.quant.close()


def eval_batches(windows: Windows, vocab_size: int, device: torch.device) -> Iterator[np.ndarray]:
    """The windows in batches whose float32 logits fit `LOGIT_BUDGET_BYTES` on `device`."""
    per_window = windows.ctx * vocab_size * 4
    size = max(1, LOGIT_BUDGET_BYTES[device.type] // per_window)
    for start in range(0, len(windows.tokens), size):
        yield windows.tokens[start : start + size]


def _scored(logits: torch.Tensor, windows: Windows) -> torch.Tensor:
    """(B, T, V) -> (B·P, V): the logits of the scored positions."""
    return logits[:, windows.score_start : windows.ctx - 1].reshape(-1, logits.shape[-1])


def _targets(batch: np.ndarray, windows: Windows) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch[:, windows.score_start + 1 :]))


# ---------------------------------------------------------------------------------------------
# Tensor diagnosis (pure)


def rel_rmse(found: torch.Tensor, expected: torch.Tensor) -> float:
    """‖found − expected‖ / ‖expected‖ (inf when expected is all zeros and found is not),
    in float64 a block at a time."""
    return _relative(*squared_error_sums(found, expected))


def squared_error_sums(found: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(‖found − expected‖², ‖expected‖²), summed in float64 `COMPARE_BLOCK_VALUES` at a time
    (the float32 difference is within 2⁻²⁴ of the exact one; 2.6x faster here than float64
    copies of both tensors)."""
    found, expected = found.reshape(-1), expected.reshape(-1)
    error = scale = 0.0
    for start in range(0, expected.numel(), COMPARE_BLOCK_VALUES):
        block = slice(start, start + COMPARE_BLOCK_VALUES)
        reference = expected[block].float()
        error += torch.linalg.vector_norm(found[block].float() - reference, dtype=torch.float64).item() ** 2
        scale += torch.linalg.vector_norm(reference, dtype=torch.float64).item() ** 2
    return error, scale


def _relative(error_squared: float, scale_squared: float) -> float:
    error, scale = math.sqrt(error_squared), math.sqrt(scale_squared)
    if scale == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / scale


def _blockwise_rel_rmse(found: Callable[[int], torch.Tensor], expected: Callable[[int], torch.Tensor],
                        rows: int, block_rows: int) -> float:
    """rel_rmse of a 2-D tensor read a block of rows at a time (`found(start)`, `expected(start)`:
    rows start .. start + block_rows)."""
    error = scale = 0.0
    for start in range(0, rows, block_rows):
        block_error, block_scale = squared_error_sums(found(start), expected(start))
        error, scale = error + block_error, scale + block_scale
    return _relative(error, scale)


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> GGML's interleaved order (what a GGUF writer applies)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def tensor_errors(base: Mapping[str, torch.Tensor], quant: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """rel_rmse of every quant tensor against the base tensor of the same name and shape, one
    tensor of each at a time (the mappings may read them from their files when asked)."""
    missing = sorted(set(base) ^ set(quant))
    if missing:
        raise InputError(f"the base and quant models hold different tensors: {missing[:4]}")
    errors = {}
    for name in sorted(base):
        found, expected = quant[name], base[name]
        if found.shape != expected.shape:
            raise InputError(f"tensor {name}: shape {tuple(found.shape)} in the quant, {tuple(expected.shape)} in the base")
        errors[name] = rel_rmse(found, expected)
    return errors


def _check_same_tensors(base: Mapping[str, tuple[int, ...]], quant: Mapping[str, tuple[int, ...]]) -> None:
    """The quant holds the base's tensors (names -> shapes) and no other, from the files'
    headers: nothing is read."""
    missing = sorted(set(base) ^ set(quant))
    if missing:
        raise InputError(f"the base and quant models hold different tensors: {missing[:4]}")
    for name, shape in base.items():
        if quant[name] != shape:
            raise InputError(f"tensor {name}: shape {quant[name]} in the quant, {shape} in the base")


def diagnose_tensor(
    name: str, base: Mapping[str, torch.Tensor], quant: Mapping[str, torch.Tensor], config: ModelConfig,
    flagged: list[str],
) -> str:
    """One sentence naming the likely cause of `name`'s error (reading a few tensors at a time)."""
    found = quant[name]
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    kind = name.split(".")[-2] if name.count(".") >= 2 else ""
    if kind in heads and found.dim() == 2:
        if rel_rmse(permute_qk(found, heads[kind]), base[name]) < MATCH_REL_RMSE:
            return (f"{name}: rows in the wrong order, the GGUF writer skipped the Q/K permutation "
                    "(the reader undid one that was never applied) (conversion)")
        if rel_rmse(unpermute_qk(found, heads[kind]), base[name]) < MATCH_REL_RMSE:
            return (f"{name}: rows still in GGML's interleaved Q/K order: the reader did not undo the "
                    "permutation, or the writer applied it twice (conversion)")
    for other in flagged:
        if other != name and base[other].shape == found.shape and rel_rmse(found, base[other]) < MATCH_REL_RMSE:
            return f"{name}: holds the weights of {other} (tensors swapped in conversion)"
    return f"{name}: {_worst_block(found, base[name])}"


def _worst_block(found: torch.Tensor, expected: torch.Tensor) -> str:
    """Where the error concentrates: the worst row, its share of the squared error, and its
    worst 32-column group (the smallest GGML block)."""
    if found.dim() != 2 or found.shape[1] % 32:
        return "far from the base weights"
    block_rows = max(1, COMPARE_BLOCK_VALUES // found.shape[1])
    row_error = torch.cat([(found[start:start + block_rows].double() - expected[start:start + block_rows].double())
                           .square().sum(-1) for start in range(0, len(found), block_rows)])
    total = row_error.sum().item()
    if not math.isfinite(total) or total == 0.0:
        return "holds non-finite values (NaN/Inf): a corrupt quant block"
    row = int(row_error.argmax())
    squared = (found[row].double() - expected[row].double()).square()
    group = int(squared.reshape(-1, 32).sum(-1).argmax())
    return (f"error concentrated in row {row} ({100 * row_error[row].item() / total:.0f}% of the tensor's "
            f"squared error), worst at columns {group * 32}..{group * 32 + 31}: a corrupt quant block")


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class ParityOptions:
    """What `shipkit parity` compares and how; defaults are the CLI's."""

    base: Path
    quant: Path
    tokens_dir: Path
    n_tokens: int = 65536
    ctx: int = 512
    engines: tuple[str, ...] = (TORCH, LLAMA_CPP)
    device: str = "auto"
    threads: int = 1  # llama.cpp threads spin-wait, so extra threads on busy cores slow it down
    contract: Path | None = None
    run_dir: Path | None = None
    tokenizer_tokens: int = DEFAULT_TOKEN_BUDGET  # val text tokens the tokenizer check compares


def run_parity(options: ParityOptions) -> dict[str, Any]:
    """Measure, gate, and (with `run_dir`) write `RUN_DIR/evidence/parity.json`.

    Returns the evidence dict (its `verdict` is "PASS" or "FAIL"); never raises on a failed
    gate (the CLI does). Raises InputError for unusable inputs.
    """
    contract = load_contract(options.contract)
    windows = eval_windows(options.tokens_dir, options.n_tokens, options.ctx)
    base = load_model_file(options.base)
    quant = load_model_file(options.quant)
    if quant.format != "gguf":
        raise InputError(f"{options.quant}: the quantized model must be a .gguf file")
    _check_inputs(base, quant, windows)
    with tempfile.TemporaryDirectory(prefix="shipkit-parity-") as scratch:
        measured = _measure(options, base, quant, windows, contract.parity.agreement, Path(scratch))
    if LLAMA_CPP in options.engines:
        tokenizer = check_tokenizer(quant.path, options.tokens_dir, base.config.to_dict(),
                                    token_budget=options.tokenizer_tokens)
    else:
        tokenizer = skipped_section("the tokenizer check reads the GGUF with llama.cpp (--engine both)")
    evidence = _evidence(options, contract, base, quant, windows, measured, tokenizer)
    if options.run_dir is not None:
        write_evidence(options.run_dir, "parity", evidence)
    return evidence


def _check_inputs(base: LoadedModel, quant: LoadedModel, windows: Windows) -> None:
    differing = _config_differences(base.config, quant.config)
    if differing:
        raise InputError(f"{quant.path}: not a quant of {base.path} (config differs in {', '.join(differing)})")
    _check_same_tensors(base.weights.shapes, quant.weights.shapes)
    if base.tokenizer_sha256 and base.tokenizer_sha256 != windows.tokenizer_sha256:
        raise InputError(f"{base.path}: trained with a different tokenizer than the --tokens folder's")
    if int(windows.tokens.max()) >= base.config.vocab_size:
        raise InputError(f"the val tokens hold id {int(windows.tokens.max())}, beyond the model's vocab_size {base.config.vocab_size}")
    if windows.ctx > base.config.max_position_embeddings:
        raise InputError(f"--ctx {windows.ctx}: exceeds the model's max_position_embeddings {base.config.max_position_embeddings}")


def _config_differences(base: ModelConfig, quant: ModelConfig) -> list[str]:
    """Fields that differ; floats are compared at float32 precision, which is what GGUF stores."""
    differing = []
    for name, value in base.to_dict().items():
        if name in TOKEN_ID_FIELDS:
            continue
        other = getattr(quant, name)
        same = math.isclose(value, other, rel_tol=1e-6) if isinstance(value, float) else value == other
        if not same:
            differing.append(name)
    return differing


@dataclass
class Measured:
    engines: dict[str, EngineResult]
    agreement: PositionStats | None
    agreement_model: str | None  # what llama.cpp ran as the base
    agreement_side: str | None
    tensor_errors: dict[str, float]


def _measure(
    options: ParityOptions, base: LoadedModel, quant: LoadedModel, windows: Windows,
    agreement_thresholds: dict[str, Threshold], scratch: Path,
) -> Measured:
    device = resolve_device(options.device)
    torch_engine = TorchEngine(base, quant, device) if TORCH in options.engines else None
    llama_engine = base_gguf = None
    if LLAMA_CPP in options.engines:
        base_gguf = _base_gguf(base, options.tokens_dir, scratch)
        llama_engine = LlamaCppEngine(base_gguf, quant.path, windows.ctx, options.threads)
    agreement_parts: list[PositionStats] = []
    side = None
    torch_steps = (torch_engine.steps(windows, keep_base_logits=llama_engine is not None) if torch_engine
                   else itertools.repeat(None))
    try:
        for batch, torch_base in zip(eval_batches(windows, base.config.vocab_size, device), torch_steps):
            llama_base = llama_engine.step(batch, windows) if llama_engine else None
            if torch_base is not None and llama_base is not None:
                targets = _targets(batch, windows).reshape(-1)
                agreement_parts.append(position_stats(torch_base, llama_base, targets))
        agreement = PositionStats.concat(agreement_parts) if agreement_parts else None
        if agreement is not None and not _agrees(agreement, agreement_thresholds):
            probe = windows.tokens[:SIDE_PROBE_WINDOWS]
            side = _agreement_side(base, base_gguf, probe, device, llama_engine.base, agreement_thresholds)
    finally:
        if llama_engine:
            llama_engine.close()
    results = {engine.result.name: engine.result for engine in (torch_engine, llama_engine) if engine}
    agreement_model = None if base_gguf is None else (
        str(base_gguf) if base.format == "gguf" else f"{base.path} written as an F32 GGUF")
    errors = torch_engine.tensor_errors if torch_engine else tensor_errors(base.weights, quant.weights)
    return Measured(results, agreement, agreement_model, side, errors)


def _base_gguf(base: LoadedModel, tokens_dir: Path, scratch: Path) -> Path:
    """The base model as a GGUF llama.cpp can load: the file itself, or an F32 conversion."""
    if base.format == "gguf":
        return base.path
    tokenizer = Path(tokens_dir) / "tokenizer.json"
    out = scratch / f"{base.path.stem}-F32.gguf"
    quantize.write_gguf(base.path, out, "F32", tokenizer_path=tokenizer)
    return out


def _agreement_side(base: LoadedModel, base_gguf: Path, probe: np.ndarray, device: torch.device,
                    llama_base: LlamaCppModel, thresholds: dict[str, Threshold]) -> str:
    """Torch on the base weights and llama.cpp on the base GGUF disagree: run a few windows
    through torch on the weights read back from that GGUF to tell which side is wrong."""
    if base.format == "gguf":
        return "conversion: shipkit's GGUF reader and llama.cpp read the base GGUF differently"
    windows = Windows(tokens=probe, tokenizer_sha256="")
    targets = _targets(probe, windows).reshape(-1)
    reference = scored_logits(base, windows, device)
    reread_logits = scored_logits(load_model_file(base_gguf), windows, device)
    llama_logits = _scored(torch.stack([llama_base.run(window)[0] for window in probe]), windows)
    if _agrees(position_stats(reference, reread_logits, targets), thresholds):
        return ("conversion: the F32 GGUF round-trips through shipkit's reader but llama.cpp reads it "
                "differently (writer and reader share a layout bug, e.g. Q/K permutation or metadata)")
    if _agrees(position_stats(llama_logits, reread_logits, targets), thresholds):
        return "conversion: the GGUF writer (both runtimes read the F32 GGUF alike, and it differs from the checkpoint)"
    return "conversion: the GGUF writer and reader (shipkit reads the F32 GGUF back matching neither the checkpoint nor llama.cpp)"


def _agrees(stats: PositionStats, thresholds: dict[str, Threshold]) -> bool:
    metrics = agreement_metrics(stats)
    return all(threshold.passes(metrics[name]) for name, threshold in thresholds.items())


# ---------------------------------------------------------------------------------------------
# The gate and the evidence


def _evidence(options: ParityOptions, contract: Contract, base: LoadedModel, quant: LoadedModel, windows: Windows,
              measured: Measured, tokenizer: dict[str, Any]) -> dict[str, Any]:
    parameters = parameter_count(base.config)
    band, thresholds = contract.parity.thresholds_for(parameters)
    failures: list[str] = []
    causes: list[str] = []
    engines = {}
    for name, result in measured.engines.items():
        engines[name] = _engine_section(result, windows, thresholds)
        failures += [f"{name}.{metric}" for metric, c in engines[name]["checks"].items() if c["verdict"] == FAIL]
    for engine in contract.parity.required_engines:
        if engine not in measured.engines:
            failures.append(f"{engine}: required by the contract but not run")
    agreement = _agreement_section(measured, contract)
    if agreement["verdict"] == FAIL:
        failures += [f"agreement.{m}" for m, c in agreement["checks"].items() if c["verdict"] == FAIL]
        causes.append(agreement["side"] or "conversion: the two runtimes disagree on the base model")
    tensors = _tensor_section(measured.tensor_errors, contract, base, quant)
    if tensors["verdict"] == FAIL:
        failures.append("tensors.rel_rmse")
        causes += [entry["cause"] for entry in tensors["flagged"]]
    if tokenizer["verdict"] == FAIL:
        failures += [f"tokenizer.{part}" for part in tokenizer["failed"]]
        causes.append(_tokenizer_cause(tokenizer))
    verdict = FAIL if failures else PASS
    return {
        "schema_version": SCHEMA_VERSION,
        "verdict": verdict,
        "failed": failures,
        "causes": causes,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shipkit_version": __version__,
        "host": platform.node(),
        "base": {"path": str(base.path), "format": base.format, "sha256": sha256_file(base.path)},
        "quant": {"path": str(quant.path), "sha256": sha256_file(quant.path), "bytes": quant.path.stat().st_size,
                  "tensor_types": gguf_tensor_types(quant.path)},
        "model": base.config.to_dict(),
        "parameters": parameters,
        "tokens": {
            "tokens_dir": str(options.tokens_dir),
            "split": "val",
            "tokenizer_sha256": windows.tokenizer_sha256,
            "ctx": windows.ctx,
            "windows": len(windows.tokens),
            "tokens_evaluated": int(windows.tokens.size),
            "positions_scored": len(windows.tokens) * windows.positions_per_window,
        },
        "contract": {
            "name": contract.name,
            "source": contract.source,
            "reference": contract.parity.reference,
            "band": band,
            "band_reason": _band_reason(contract, band),
            "required_engines": list(contract.parity.required_engines),
        },
        "engines": engines,
        "agreement": agreement,
        "tensors": tensors,
        "tokenizer": tokenizer,
    }


def _tokenizer_cause(tokenizer: dict[str, Any]) -> str:
    first = tokenizer["documents"]["first_difference"]
    if first is not None:
        return (f"tokenizer: llama.cpp tokenizes {tokenizer['documents']['documents_differing']} val "
                f"document(s) differently from the HF tokenizer (the GGUF's pre-tokenizer "
                f"{tokenizer['gguf_pre']!r}, the tokenizer's {tokenizer['pre']!r}); "
                f"first at document {first['document']}, token {first['position']}: {first['text']!r}")
    if "special_tokens" in tokenizer["failed"]:
        return "tokenizer: llama.cpp adds BOS/EOS differently from the HF tokenizer"
    return f"tokenizer: chat template: {tokenizer['chat_template'].get('note')}"


def _band_reason(contract: Contract, band: str) -> str:
    for size_band in contract.parity.size_bands:
        if size_band.name == band:
            return size_band.reason
    return contract.parity.reference


def _engine_section(result: EngineResult, windows: Windows, thresholds: dict[str, Threshold]) -> dict[str, Any]:
    metrics = summarize(PositionStats.concat(result.parts))
    cosines = result.hidden_cosine()
    metrics["hidden_cosine_min"] = min(cosines) if cosines and None not in cosines else None
    checks = {name: check(metrics[name], threshold) for name, threshold in thresholds.items()}
    return {
        "device": result.device,
        "seconds": result.seconds,
        "tokens_per_second": windows.tokens.size / result.seconds if result.seconds > 0 else None,
        "metrics": metrics,
        "hidden_cosine": cosines,
        "hidden_cosine_note": None if cosines is not None else NO_LAYERS_NOTE,
        "checks": checks,
        "verdict": FAIL if any(c["verdict"] == FAIL for c in checks.values()) else PASS,
    }


def _agreement_section(measured: Measured, contract: Contract) -> dict[str, Any]:
    if measured.agreement is None:
        return {"verdict": SKIPPED, "model": None, "metrics": None, "checks": {}, "side": None,
                "note": "engine agreement needs both engines (--engine both)"}
    metrics = agreement_metrics(measured.agreement)
    checks = {name: check(metrics[name], threshold) for name, threshold in contract.parity.agreement.items()}
    failed = any(c["verdict"] == FAIL for c in checks.values())
    return {
        "verdict": FAIL if failed else PASS,
        "model": measured.agreement_model,
        "metrics": metrics,
        "checks": checks,
        "side": measured.agreement_side if failed else None,
        "note": "torch on the base weights vs llama.cpp on the base GGUF, same positions",
    }


def _tensor_section(errors: dict[str, float], contract: Contract, base: LoadedModel, quant: LoadedModel) -> dict[str, Any]:
    threshold = contract.parity.tensors.get("rel_rmse")
    worst = sorted(errors.items(), key=lambda item: math.inf if math.isnan(item[1]) else item[1], reverse=True)
    flagged_names = [name for name, error in worst if threshold is not None and not threshold.passes(error)]
    flagged = [
        {"name": name, "rel_rmse": _finite(errors[name]),
         "cause": diagnose_tensor(name, base.weights, quant.weights, base.config, flagged_names)}
        for name in flagged_names
    ]
    checks = {} if threshold is None else {"rel_rmse": check(_finite(worst[0][1]), threshold)}
    return {
        "verdict": FAIL if flagged else PASS,
        "checks": checks,
        "worst": [{"name": name, "rel_rmse": _finite(error)} for name, error in worst[:5]],
        "flagged": flagged,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
