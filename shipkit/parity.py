"""The parity gate: does the quantized GGUF behave like the model it was made from?

Over held-out val tokens, in windows of `ctx` tokens, both models predict every position; the
second half of each window is scored the way `llama-perplexity --kl-divergence` scores it
(the first half is context). Two engines run the comparison: shipkit's torch forward on
weights dequantized from the GGUF bytes, and llama.cpp on the GGUF files themselves. The same
F32 model must also give the same predictions in both engines (engine agreement), and every
dequantized tensor is compared with the base weights, so a failure can name its cause.
Field-by-field meaning of the evidence: docs/parity.md.
"""

from __future__ import annotations

import ctypes
import math
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader

from shipkit import __version__, quantize
from shipkit.apr import read_apr
from shipkit.contract import Contract, Threshold, load_contract
from shipkit.errors import InputError, IntegrityError
from shipkit.evidence import write_evidence
from shipkit.fsutil import sha256_file
from shipkit.llama_runtime import bindings
from shipkit.model import CausalLM, ModelConfig, parameter_count
from shipkit.tokenize import read_tokens
from shipkit.tokenizer_fidelity import DEFAULT_TOKEN_BUDGET, check_tokenizer, skipped_section

SCHEMA_VERSION = 1
PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
TORCH, LLAMA_CPP = "torch", "llama.cpp"
# Bytes of float32 logits one torch batch may hold per model (both models are held at once).
LOGIT_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}
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


@dataclass
class LoadedModel:
    path: Path
    format: str  # "apr" or "gguf"
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer_sha256: str | None = None


def load_model_file(path: str | Path) -> LoadedModel:
    """An `.apr` weights file or a GGUF (dequantized to float32, HF names)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.suffix == ".apr":
        checkpoint = read_apr(path)
        if checkpoint.metadata.get("kind") != "weights" or checkpoint.config is None:
            raise InputError(f"{path}: not a weights checkpoint with a model config (give an epoch or best .apr)")
        weights = {name: tensor.float() for name, tensor in checkpoint.tensors.items()}
        tokenizer = checkpoint.metadata.get("tokenizer") or {}
        return LoadedModel(path, "apr", checkpoint.config, weights, tokenizer.get("sha256"))
    if path.suffix == ".gguf":
        config, weights = quantize.load_gguf_model(path)
        return LoadedModel(path, "gguf", config, {name: t.float() for name, t in weights.items()})
    raise InputError(f"{path}: expected an .apr or .gguf file")


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, e.g. {"Q4_K": 12, "F32": 5}."""
    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
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


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device) -> CausalLM:
    model = CausalLM(config)
    model.load_weights(weights)
    return model.to(device).eval()


@torch.inference_mode()
def torch_forward(model: CausalLM, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B, T) ids -> float32 logits (B, T, V) and the residual states (L+1 tensors (B, T, d))."""
    states = model.hidden_states(tokens)
    return model.lm_head(model.model.norm(states[-1])).float(), states


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
    """Base and quant as shipkit `CausalLM`s on `device`; compares them batch by batch."""

    def __init__(self, base: LoadedModel, quant: LoadedModel, device: torch.device) -> None:
        self.device = device
        self.base = build_model(base.config, base.weights, device)
        self.quant = build_model(quant.config, quant.weights, device)
        self.result = EngineResult(TORCH, str(device))

    def step(self, batch: np.ndarray, windows: Windows) -> torch.Tensor:
        """Score one batch of windows (B, T); returns the base model's scored logits on the CPU."""
        started = time.perf_counter()
        ids = torch.from_numpy(batch).to(self.device)
        base_logits, base_states = torch_forward(self.base, ids)
        quant_logits, quant_states = torch_forward(self.quant, ids)
        targets = _targets(batch, windows).to(self.device).reshape(-1)
        base_scored = _scored(base_logits, windows)
        self.result.parts.append(position_stats(base_scored, _scored(quant_logits, windows), targets))
        scored = slice(windows.score_start, windows.ctx - 1)
        sums = layer_cosine_sums([s[:, scored] for s in base_states[1:]], [s[:, scored] for s in quant_states[1:]])
        self.result.add_cosines(sums, len(batch) * windows.positions_per_window)
        base_scored = base_scored.cpu()
        self.result.seconds += time.perf_counter() - started
        return base_scored


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
    """‖found − expected‖ / ‖expected‖ (inf when expected is all zeros and found is not)."""
    error = torch.linalg.vector_norm((found.double() - expected.double()).flatten()).item()
    scale = torch.linalg.vector_norm(expected.double().flatten()).item()
    if scale == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / scale


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> GGML's interleaved order (what a GGUF writer applies)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def tensor_errors(base: dict[str, torch.Tensor], quant: dict[str, torch.Tensor]) -> dict[str, float]:
    """rel_rmse of every quant tensor against the base tensor of the same name and shape."""
    missing = sorted(set(base) ^ set(quant))
    if missing:
        raise InputError(f"the base and quant models hold different tensors: {missing[:4]}")
    errors = {}
    for name in sorted(base):
        if base[name].shape != quant[name].shape:
            raise InputError(f"tensor {name}: shape {tuple(quant[name].shape)} in the quant, {tuple(base[name].shape)} in the base")
        errors[name] = rel_rmse(quant[name], base[name])
    return errors


def diagnose_tensor(
    name: str, base: dict[str, torch.Tensor], quant: dict[str, torch.Tensor], config: ModelConfig, flagged: list[str]
) -> str:
    """One sentence naming the likely cause of `name`'s error."""
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
    squared = (found.double() - expected.double()).pow(2)
    row_error = squared.sum(-1)
    total = row_error.sum().item()
    if not math.isfinite(total) or total == 0.0:
        return "holds non-finite values (NaN/Inf): a corrupt quant block"
    row = int(row_error.argmax())
    group = int(squared[row].reshape(-1, 32).sum(-1).argmax())
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
    try:
        for batch in eval_batches(windows, base.config.vocab_size, device):
            torch_base = torch_engine.step(batch, windows) if torch_engine else None
            llama_base = llama_engine.step(batch, windows) if llama_engine else None
            if torch_base is not None and llama_base is not None:
                targets = _targets(batch, windows).reshape(-1)
                agreement_parts.append(position_stats(torch_base, llama_base, targets))
        agreement = PositionStats.concat(agreement_parts) if agreement_parts else None
        if agreement is not None and not _agrees(agreement, agreement_thresholds):
            probe = windows.tokens[:SIDE_PROBE_WINDOWS]
            side = _agreement_side(base, base_gguf, probe, device, torch_engine.base, llama_engine.base,
                                   agreement_thresholds)
    finally:
        if llama_engine:
            llama_engine.close()
    results = {engine.result.name: engine.result for engine in (torch_engine, llama_engine) if engine}
    agreement_model = None if base_gguf is None else (
        str(base_gguf) if base.format == "gguf" else f"{base.path} written as an F32 GGUF")
    return Measured(results, agreement, agreement_model, side, tensor_errors(base.weights, quant.weights))


def _base_gguf(base: LoadedModel, tokens_dir: Path, scratch: Path) -> Path:
    """The base model as a GGUF llama.cpp can load: the file itself, or an F32 conversion."""
    if base.format == "gguf":
        return base.path
    tokenizer = Path(tokens_dir) / "tokenizer.json"
    out = scratch / f"{base.path.stem}-F32.gguf"
    quantize.write_gguf(base.path, out, "F32", tokenizer_path=tokenizer)
    return out


def _agreement_side(base: LoadedModel, base_gguf: Path, probe: np.ndarray, device: torch.device, torch_base: CausalLM,
                    llama_base: LlamaCppModel, thresholds: dict[str, Threshold]) -> str:
    """Torch on the base weights and llama.cpp on the base GGUF disagree: run a few windows
    through torch on the weights read back from that GGUF to tell which side is wrong."""
    if base.format == "gguf":
        return "conversion: shipkit's GGUF reader and llama.cpp read the base GGUF differently"
    windows = Windows(tokens=probe, tokenizer_sha256="")
    targets = _targets(probe, windows).reshape(-1)
    ids = torch.from_numpy(probe).to(device)
    reread = load_model_file(base_gguf)
    reference = _scored(torch_forward(torch_base, ids)[0], windows).cpu()
    reread_logits = _scored(torch_forward(build_model(reread.config, reread.weights, device), ids)[0], windows).cpu()
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
