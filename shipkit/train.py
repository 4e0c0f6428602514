"""The trainer: from a token folder to a run folder with checkpoints and training evidence.

An epoch is `steps_per_epoch` optimizer steps; after each, the model is scored on the fixed
validation set, `ckpt/epoch-NNN.apr` (weights), `ckpt/epoch-NNN.metadata.json` (metrics) and
`ckpt/epoch-NNN.resume.apr` (optimizer moments, RNG, data cursor, history) are written, `best.apr`
is refreshed, and `evidence/training-summary.json` is rewritten. Layout and formulas:
docs/training.md; evidence fields: docs/evidence.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import math
import os
import platform
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from shipkit import __version__
from shipkit.apr import read_apr, write_apr
from shipkit.data import EmptyStreamError, TrainStream, validation_windows
from shipkit.errors import InputError, TrainingError
from shipkit.evidence import write_evidence
from shipkit.fsutil import atomic_write, sha256_file, write_json
from shipkit.graphed_step import GraphedTrainStep
from shipkit.model import (
    CausalLM,
    ModelConfig,
    finite_float,
    flops_per_token,
    is_int,
    parameter_count,
    shown,
    weight_shapes,
)
from shipkit.predict import (
    Prediction,
    judge_predictions,
    parse_prediction,
    record_predictions,
)
from shipkit.presets import TrainConfig, apply_overrides
from shipkit.tokenize import read_manifest, read_tokens
from shipkit.train_step import (
    build_optimizer,
    load_optimizer_tensors,
    optimizer_tensors,
    train_step,
    training_model,
)
from shipkit.train_step import lr_at as schedule_lr_at

EVIDENCE_NAME = "training-summary"
CKPT_DIR = "ckpt"
BEST_CHECKPOINT = f"{CKPT_DIR}/best.apr"
TOKENIZER_FILE = "tokenizer.json"
DIVERGENCE_FACTOR = 2.0  # val[n] > 2 × val[n−1] stops the run (issue 5)
CONVERGENCE_TOLERANCE = 0.01  # relative val change between the last two epochs called a plateau
H100_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100 SXM, the MFU denominator
LOG_EVERY_STEPS = 10  # how often losses are pulled from the device (each pull is a sync)
# The verdict's rules (docs/evidence.md): an epoch's train loss is the mean of its steps' losses
# while the model improves, its val loss is measured at the epoch's end.
FIRST_PASS_WRAPS = 1.0  # until the stream wraps, every window is new: the train loss is held-out
EPOCH_MEAN_LAG = 0.5  # a convex falling curve's mean lies at most half its fall above its end
# What a first-pass gap says: windows are new, but other windows of the same train documents may
# have been trained on, and a model learns a document's own names from them (docs/evidence.md).
HARDER_VAL = ("the val documents are harder for the model than the train documents (the splits differ, "
              "or it learned the train documents' own text from their other windows)")
EASIER_VAL = "the val documents are easier for the model than the train documents: the splits differ"
EARLY_STOP = "early_stop"  # the stop_reason of a run that ran out of early_stop_patience
# A train_fraction keeps whole blocks of this many contiguous windows: stretches of real text
# (2,048 tokens at seq_len 128), and few enough slices even for a billion-token split.
SUBSET_BLOCK_WINDOWS = 16
SUBSET_SEED_WORD = 1 << 62  # beside the seed, a word no pass number reaches (passes use [seed, pass])
# Held (flock) by the process writing RUN_DIR; a dotfile, so ship's output digests skip it.
RUN_LOCK_FILE = ".train.lock"
RESUME_KEYS = {"state", "adam_step", "hyperparameters", "data_dir", "world_size"}
# The numbers of an epoch record that the verdicts of a resumed run read again.
EPOCH_RECORD_NUMBERS = ("train_loss", "val_loss", "gap", "wraps")
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
RNG_CPU_TENSOR = "rng.torch_cpu"
RNG_CUDA_TENSOR = "rng.torch_cuda"
REASON_CHARS = 120  # of the tokenizers library's message, which may quote the crafted file


# ---------------------------------------------------------------------------------------------
# Pure functions: schedule and verdicts


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) under `config`'s schedule."""
    return schedule_lr_at(
        step,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        num_steps=config.num_steps,
        min_lr_ratio=config.min_lr_ratio,
    )


def is_divergence(previous_val_loss: float | None, val_loss: float) -> bool:
    return previous_val_loss is not None and val_loss > DIVERGENCE_FACTOR * previous_val_loss


def convergence_status(val_losses: list[float], stop_reason: str | None) -> str:
    if stop_reason in ("non-finite-loss", "divergence"):
        return "diverged"
    if len(val_losses) < 2:
        return "insufficient-epochs"
    previous, last = val_losses[-2], val_losses[-1]
    if last < previous * (1 - CONVERGENCE_TOLERANCE):
        return "converging"
    if last > previous * (1 + CONVERGENCE_TOLERANCE):
        return "worsening"
    return "plateaued"


def epochs_without_improvement(epochs: list[dict[str, Any]]) -> int:
    """Epochs recorded after the one with the lowest val loss (read from the records, which
    every DDP rank holds, so all ranks stop at the same epoch)."""
    return len(epochs) - 1 - best_index(epochs) if epochs else 0


def early_stop_due(epochs: list[dict[str, Any]], patience: int) -> bool:
    """Whether `patience` epochs have passed without a new best val loss (patience 0: never)."""
    return patience > 0 and epochs_without_improvement(epochs) >= patience


def train_lag(epochs: list[dict[str, Any]], index: int) -> float:
    """How far epoch `index`'s (0-based, not the first) mean train loss may sit above the loss
    at its end: half its fall from the epoch before. For a decelerating (convex) loss curve the
    fall within an epoch is at most the fall of the epoch means, and the mean of a convex stretch
    lies at most half its fall above its end."""
    fall = epochs[index - 1]["train_loss"] - epochs[index]["train_loss"]
    return EPOCH_MEAN_LAG * max(0.0, fall)


def gap_bounds(epochs: list[dict[str, Any]], index: int) -> tuple[float, float]:
    """(low, high) bounds of val − train at the end of epoch `index` (not the first): the
    recorded gap, whose mean train loss errs high, and the gap with the train loss moved down by
    `train_lag`. A claim that val sits above train uses the low bound, below train the high one."""
    gap = epochs[index]["gap"]
    return gap, gap + train_lag(epochs, index)


def first_pass_index(epochs: list[dict[str, Any]]) -> int | None:
    """The last epoch after the first that ended within the first pass: every window it trained
    on was new, so its train loss is a held-out measure and its gap compares the two splits.
    None when epoch 2 already wrapped (epoch 1's mean starts at the untrained model's loss)."""
    indices = [index for index in range(1, len(epochs)) if epochs[index]["wraps"] <= FIRST_PASS_WRAPS]
    return indices[-1] if indices else None


def best_index(epochs: list[dict[str, Any]]) -> int:
    return min(range(len(epochs)), key=lambda index: epochs[index]["val_loss"])


def onset(epochs: list[dict[str, Any]], holds: Callable[[int], bool]) -> int | None:
    """The 1-based epoch from which `holds(index)` is true, past the first pass, through the
    last epoch; None if it does not hold at the last."""
    found = None
    for index in range(len(epochs) - 1, 0, -1):
        if epochs[index]["wraps"] <= FIRST_PASS_WRAPS or not holds(index):
            break
        found = index + 1
    return found


def val_rise(epochs: list[dict[str, Any]], best: int, rise_epochs: int) -> int | None:
    """The length of the first run of at least `rise_epochs` consecutive epochs after the best
    (0-based `best`), past the first pass, in which val rose while train fell; None if there is
    none. Such a run shows that val turned after the best epoch and that it is not noise."""
    length = 0
    for index in range(best + 1, len(epochs)):
        previous, current = epochs[index - 1], epochs[index]
        if (current["val_loss"] > previous["val_loss"] and current["train_loss"] < previous["train_loss"]
                and current["wraps"] > FIRST_PASS_WRAPS):
            length += 1
        elif length >= rise_epochs:
            break
        else:
            length = 0
    return length if length >= rise_epochs else None


class Finding(NamedTuple):
    """A verdict rule that fired: the verdict's name, the rule's id, the sentence with its
    numbers, and the epoch the run turned (overfitting, memorization-suspect)."""

    verdict: str
    rule: str
    reason: str
    turn_epoch: int | None = None


def training_verdict(
    epochs: list[dict[str, Any]],
    *,
    threshold: float,
    gap_growth: float,
    rise_epochs: int,
) -> dict[str, Any]:
    """What the loss curves say happened, judged at the last epoch: healthy, too-early,
    split-shift, overfitting or memorization-suspect, with the rule that decided, its numbers,
    the best-val epoch and (overfitting, memorization-suspect) the epoch the run turned. The
    thresholds are TrainConfig's memorization_threshold, overfitting_gap_growth and
    overfitting_rise_epochs. Rules and precedence: docs/evidence.md."""
    numbers: dict[str, Any] = {
        "epoch": len(epochs) or None,
        "gap": epochs[-1]["gap"] if epochs else None,
        "wraps": epochs[-1]["wraps"] if epochs else 0.0,
        "train_lag": train_lag(epochs, len(epochs) - 1) if len(epochs) > 1 else None,
        "first_pass_epoch": None,
        "first_pass_gap": None,
        "gap_growth": None,
        "best_epoch": best_index(epochs) + 1 if epochs else None,
        "threshold": threshold,
        "overfitting_gap_growth": gap_growth,
        "overfitting_rise_epochs": rise_epochs,
    }
    if not epochs:
        finding = Finding("too-early", "no-epoch", "no completed epoch")
    elif len(epochs) == 1:
        finding = Finding("too-early", "single-epoch", "one epoch: its mean train loss starts at the "
                          "untrained model's, so it cannot be compared with val")
    elif numbers["wraps"] <= FIRST_PASS_WRAPS:
        numbers.update(first_pass_epoch=len(epochs), first_pass_gap=numbers["gap"])
        finding = _first_pass_finding(epochs, threshold)
    else:
        first = first_pass_index(epochs)
        if first is not None:
            numbers.update(first_pass_epoch=first + 1, first_pass_gap=epochs[first]["gap"])
        first_bounds = gap_bounds(epochs, first) if first is not None else (0.0, 0.0)
        numbers["gap_growth"] = epochs[-1]["gap"] - max(first_bounds[1], 0.0)
        finding = _later_pass_finding(epochs, first, first_bounds, threshold, gap_growth, rise_epochs)
    return {"verdict": finding.verdict, "rule": finding.rule, "reason": finding.reason, **numbers,
            "turn_epoch": finding.turn_epoch}


def _first_pass_finding(epochs: list[dict[str, Any]], threshold: float) -> Finding:
    """A run that has not wrapped: nothing was trained on twice, so the train loss is measured on
    windows not yet trained on, and a gap beyond the threshold is between the splits' documents."""
    low, high = gap_bounds(epochs, len(epochs) - 1)
    at = f"{epochs[-1]['wraps']:.2f} passes over the train split"
    if low > threshold:
        return Finding("split-shift", "first-pass-val-above",
                       f"val above train by {low:+.3f} nats within the first pass ({at}), where every "
                       f"window is new and the mean train loss errs high (threshold {threshold}): {HARDER_VAL}")
    if high < -threshold:
        return Finding("split-shift", "first-pass-val-below",
                       f"val below train by {-high:.3f} nats or more within the first pass ({at}), even "
                       f"with the mean train loss moved to the epoch's end (threshold {threshold}): {EASIER_VAL}")
    previous, val_loss = epochs[-2]["val_loss"], epochs[-1]["val_loss"]
    if val_loss < previous * (1 - CONVERGENCE_TOLERANCE):
        return Finding("too-early", "first-pass-falling",
                       f"{at}, under one, and val still falling ({previous:.4f} → {val_loss:.4f}): nothing "
                       "has been trained on twice, so overfitting and memorization cannot show yet")
    return Finding("healthy", "first-pass-agree",
                   f"val − train is {low:+.3f} nats within the first pass ({at}), inside ±{threshold}, and "
                   "val stopped falling")


def _later_pass_finding(
    epochs: list[dict[str, Any]],
    first: int | None,
    first_bounds: tuple[float, float],
    threshold: float,
    gap_growth: float,
    rise_epochs: int,
) -> Finding:
    """A run past its first pass, judged against its first pass (`first`, the index of the last
    epoch inside it, and that epoch's gap bounds; (0, 0) without one): first the signature that
    makes val untrustworthy, then overfitting, then a shift the first pass showed."""
    low, high = gap_bounds(epochs, len(epochs) - 1)
    at = f"{epochs[-1]['wraps']:.2f} passes over the train split"
    first_low, first_high = first_bounds
    baseline = max(first_high, 0.0)  # the first pass's gap, or 0: the splits' own difference
    baseline_text = (f"the first pass's {baseline:+.3f} (epoch {first + 1})" if first is not None
                     else "0 (no epoch after the first ended within the first pass)")
    floor = min(first_low, 0.0) - threshold  # val this far below train was not there in the first pass
    best = best_index(epochs)
    if high < floor:
        return Finding("memorization-suspect", "val-below-train",
                       f"val below train by {-high:.3f} nats or more after {at} (threshold {threshold}): "
                       "held-out text scores better than the text trained on, the signature of val text "
                       "recalled from train", onset(epochs, lambda index: gap_bounds(epochs, index)[1] < floor))
    rise = val_rise(epochs, best, rise_epochs)
    if rise is not None:
        return Finding("overfitting", "val-rose",
                       f"val turned after its best {epochs[best]['val_loss']:.4f} (epoch {best + 1}): it rose "
                       f"in {rise} consecutive epochs while train fell; at the last epoch val "
                       f"{epochs[-1]['val_loss']:.4f}, train {epochs[-1]['train_loss']:.4f} after {at}", best + 2)
    growth = low - baseline
    if growth > gap_growth:
        return Finding("overfitting", "gap-grew",
                       f"val − train grew to {low:+.3f} nats after {at}, {growth:+.3f} beyond {baseline_text} "
                       f"(threshold {gap_growth}): the model learns its training text, not what carries over "
                       "to held-out text",
                       onset(epochs, lambda index: gap_bounds(epochs, index)[0] - baseline > gap_growth))
    if first is not None and (first_low > threshold or first_high < -threshold):
        side = "above" if first_low > threshold else "below"
        return Finding("split-shift", "first-pass-shift",
                       f"val was {side} train by more than {threshold} nats in the first pass (epoch "
                       f"{first + 1}, gap {first_low:+.3f}), where every window was new: "
                       f"{HARDER_VAL if side == 'above' else EASIER_VAL}; since then the gap grew {growth:+.3f} "
                       f"(threshold {gap_growth})")
    return Finding("healthy", "agree",
                   f"after {at} val − train is {low:+.3f} nats: {growth:+.3f} beyond {baseline_text} "
                   f"(threshold {gap_growth}), val not below train by more than {threshold}, and val has "
                   "not turned")


# ---------------------------------------------------------------------------------------------
# Run state and evidence


@dataclass
class RunState:
    """Everything beyond tensors that a resume restores (stored in the resume file's metadata)."""

    run_id: str
    date: str
    step: int = 0
    cursor: int = 0
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_val_loss: float | None = None
    best_epoch: int | None = None
    best_checkpoint: dict[str, Any] | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)  # recorded before step 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def early_stop_record(state: RunState, patience: int, stop_reason: str | None) -> dict[str, Any] | None:
    """The evidence's `summary.early_stop`: null without a patience."""
    if patience == 0:
        return None
    return {
        "patience": patience,
        "epochs_without_improvement": epochs_without_improvement(state.epochs),
        "stopped_after_epoch": len(state.epochs) if stop_reason == EARLY_STOP else None,
    }


def build_evidence(
    state: RunState,
    config: TrainConfig,
    device_info: dict[str, Any],
    corpus: dict[str, Any],
    status: str,
    stop_reason: str | None,
    stop_message: str | None,
) -> dict[str, Any]:
    val_losses = [epoch["val_loss"] for epoch in state.epochs]
    summary = {
        "status": status,
        "stop_reason": stop_reason,
        "stop_message": stop_message,
        "epochs_completed": len(state.epochs),
        "steps_completed": state.step,
        "final_val_loss": val_losses[-1] if val_losses else None,
        "best_val_loss": state.best_val_loss,
        "best_epoch": state.best_epoch,
        "best_checkpoint": state.best_checkpoint,
        "convergence": convergence_status(val_losses, stop_reason),
        "memorization": training_verdict(
            state.epochs,
            threshold=config.memorization_threshold,
            gap_growth=config.overfitting_gap_growth,
            rise_epochs=config.overfitting_rise_epochs,
        ),
        "early_stop": early_stop_record(state, config.early_stop_patience, stop_reason),
    }
    finished = status != "running"
    return {
        "schema_version": 1,
        "run_id": state.run_id,
        "date": state.date,
        "host": socket.gethostname(),
        "shipkit_version": __version__,
        "device": device_info,
        "corpus": corpus,
        "model": config.model.to_dict(),
        "parameters": parameter_count(config.model),
        "hyperparameters": config.to_dict(),
        "epochs": state.epochs,
        "summary": summary,
        "predictions": judge_predictions(state.predictions, summary) if finished else state.predictions,
    }


# ---------------------------------------------------------------------------------------------
# Devices and processes


@dataclass
class Placement:
    """Where this process trains: its device, DDP rank and world size."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False  # we joined it, so we leave it when the run ends

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def setup_placement(device: str) -> Placement:
    """Resolve `auto|cpu|cuda` and, under torchrun (WORLD_SIZE > 1), join the process group
    (NCCL on CUDA, gloo on CPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device {device}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    joins = world_size > 1 and not dist.is_initialized()
    if joins:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Placement(torch_device, rank, local_rank, world_size, owns_process_group=joins)


def _release(placement: Placement) -> None:
    if placement.owns_process_group:
        dist.destroy_process_group()


def _device_info(placement: Placement, compiled: bool, cuda_graph: bool) -> dict[str, Any]:
    if placement.is_cuda:
        name = torch.cuda.get_device_name(placement.device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    return {
        "type": placement.device.type,
        "name": name,
        "world_size": placement.world_size,
        "dtype": "bfloat16" if placement.is_cuda else "float32",
        "compiled": compiled,
        "cuda_graph": cuda_graph,
    }


def _all_reduce(values: list[float], placement: Placement, op: Any = None) -> list[float]:
    if placement.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=placement.device)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


def _barrier(placement: Placement) -> None:
    if placement.world_size > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Run folder


def epoch_stem(epoch: int) -> str:
    return f"{CKPT_DIR}/epoch-{epoch:03d}"


def latest_resume_epoch(run_dir: Path) -> int:
    """Highest epoch with a complete resume companion; InputError if there is none."""
    epochs = [
        int(match.group(1))
        for path in (run_dir / CKPT_DIR).glob("epoch-*.resume.apr")
        if (match := re.fullmatch(r"epoch-(\d+)\.resume\.apr", path.name))
    ]
    if not epochs:
        raise InputError(
            f"--resume {run_dir}: no ckpt/epoch-NNN.resume.apr found (the run saved no epoch yet)"
        )
    return max(epochs)


def _copy_atomic(source: Path, destination: Path) -> None:
    with open(source, "rb") as reader, atomic_write(destination, "wb") as writer:
        shutil.copyfileobj(reader, writer, 16 << 20)


def train_subset(shards: Sequence[np.ndarray], seq_len: int, fraction: float, seed: int) -> list[np.ndarray]:
    """The stretches of the train split a run trains on: all of it at fraction 1, else a seeded
    random `fraction` of its blocks of SUBSET_BLOCK_WINDOWS windows (views, in split order), so
    a smaller corpus is a random sample of the same text, the val split untouched."""
    if fraction == 1.0:
        return list(shards)
    block_tokens = SUBSET_BLOCK_WINDOWS * seq_len
    blocks = [(number, start) for number, shard in enumerate(shards)
              for start in range(0, len(shard) - seq_len, block_tokens)]  # each holds a window
    if not blocks:
        return list(shards)  # no window at all: the stream stops the run as empty-stream
    keep = max(1, round(fraction * len(blocks)))
    chosen = np.random.default_rng([seed, SUBSET_SEED_WORD]).choice(len(blocks), keep, replace=False)
    return [shards[number][start : start + block_tokens + 1]
            for number, start in (blocks[index] for index in sorted(chosen))]


def _corpus_stats(data_dir: Path, train_split: Any, val_split: Any, val_eval_tokens: int) -> dict[str, Any]:
    manifest = read_manifest(data_dir)

    def docs(split: str) -> int:
        return sum(int(shard["docs"]) for shard in manifest["splits"][split]["shards"])

    return {
        "tokens_dir": str(data_dir),
        "train_tokens": int(train_split.total_tokens),
        "train_docs": docs("train"),
        "train_shards": len(train_split.shards),
        "val_tokens": int(val_split.total_tokens),
        "val_docs": docs("val"),
        "val_shards": len(val_split.shards),
        "val_eval_tokens": val_eval_tokens,
        "tokenizer_sha256": train_split.tokenizer_sha256,
    }


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR's writer lock (creating RUN_DIR if need be): an exclusive flock on
    RUN_DIR/.train.lock holding our pid. The kernel drops it when the process ends however it
    ends, kill -9 included, so no stale lock is left; the file itself stays (removing it would
    let two writers lock two different files). Raises InputError at once if another process
    holds it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(run_dir / RUN_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise InputError(f"{run_dir}: cannot create the run folder's lock ({error.strerror})") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise InputError(f"{run_dir} is being written by another shipkit train (pid {holder}); "
                             "wait for it to end or choose another --out") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)


def _writer_lock(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """`run_dir_lock` in the process that writes RUN_DIR (rank 0 under torchrun); the other
    ranks write nothing there and take no lock."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return run_dir_lock(run_dir)


# ---------------------------------------------------------------------------------------------
# Resume files: every field checked against the others before anything is built


@dataclass
class ResumePoint:
    """What a resume file restores besides tensors, checked."""

    config: TrainConfig
    state: RunState
    tokenizer_sha256: str
    data_dir: Path


def read_resume_point(run_dir: Path, epoch: int) -> ResumePoint:
    """`epoch`'s resume file and weights file, their metadata checked against each other and
    against the tensors (rules in docs/training.md, "Resume"). Raises InputError naming the
    file and field, IntegrityError for a corrupt file; reads no tensor data."""
    path = run_dir / f"{epoch_stem(epoch)}.resume.apr"
    checkpoint = read_apr(path, verify=False)
    try:
        point = _resume_point(checkpoint.metadata, epoch)
        _check_resume_tensors(checkpoint.tensors, point.config.model)
    except InputError as error:
        raise InputError(f"--resume {path}: {error}") from None
    weights = read_apr(run_dir / f"{epoch_stem(epoch)}.apr", verify=False)
    if weights.metadata.get("kind") != "weights" or weights.config != point.config.model:
        raise InputError(f"--resume {weights.path}: not the weights of {path.name} (kind or model config differs)")
    return point


def _resume_point(metadata: dict[str, Any], epoch: int) -> ResumePoint:
    if metadata.get("kind") != "resume":
        raise InputError(f"metadata kind: {shown(metadata.get('kind'))}, expected 'resume'")
    saved = metadata.get("resume")
    if not isinstance(saved, dict) or set(saved) != RESUME_KEYS:
        raise InputError(f"metadata resume: expected an object with keys {', '.join(sorted(RESUME_KEYS))}")
    config = TrainConfig.from_dict(saved["hyperparameters"], metadata.get("config"))
    state = _run_state(saved["state"])
    world_size = saved["world_size"]
    if not is_int(world_size) or world_size < 1:
        raise InputError(f"metadata resume.world_size: expected a positive integer, got {shown(world_size)}")
    if not isinstance(saved["data_dir"], str) or not saved["data_dir"]:
        raise InputError(f"metadata resume.data_dir: expected a folder name, got {shown(saved['data_dir'])}")
    tokenizer_sha256 = (metadata.get("tokenizer") or {}).get("sha256")
    if not isinstance(tokenizer_sha256, str):
        raise InputError("metadata tokenizer.sha256: missing (the run's tokenizer cannot be checked)")
    _check_progress(state, config, epoch)
    if saved["adam_step"] != state.step or not is_int(saved["adam_step"]):
        raise InputError(f"metadata resume.adam_step: {shown(saved['adam_step'])}, but the run is at "
                         f"step {state.step}")
    consumed = state.step * config.batch_size * world_size  # windows, all ranks together
    if state.cursor != consumed:
        raise InputError(f"metadata resume.state.cursor: {state.cursor}, but {state.step} steps of "
                         f"{config.batch_size} sequences on {world_size} rank(s) consumed {consumed} windows")
    return ResumePoint(config, state, tokenizer_sha256, Path(saved["data_dir"]))


def _run_state(data: Any) -> RunState:
    names = {f.name for f in dataclasses.fields(RunState)}
    if not isinstance(data, dict) or not {"run_id", "date"} <= set(data) <= names:
        raise InputError(f"metadata resume.state: expected an object with fields {', '.join(sorted(names))}")
    state = RunState(**data)
    where = "metadata resume.state"
    if not isinstance(state.run_id, str) or not isinstance(state.date, str):
        raise InputError(f"{where}.run_id/date: expected strings")
    for name in ("step", "cursor"):
        value = getattr(state, name)
        if not is_int(value) or value < 0:
            raise InputError(f"{where}.{name}: expected a non-negative integer, got {shown(value)}")
    if not isinstance(state.epochs, list) or not isinstance(state.predictions, list):
        raise InputError(f"{where}.epochs/predictions: expected lists")
    for entry in state.predictions:
        _check_recorded_prediction(entry)
    return state


def _check_recorded_prediction(entry: Any) -> None:
    """A recorded prediction is judged again at the end: its parts must be what its text says."""
    expr = entry.get("expr") if isinstance(entry, dict) else None
    if not isinstance(expr, str):
        raise InputError(f"metadata resume.state.predictions: entry {shown(entry)} has no expr")
    parsed = parse_prediction(expr)
    if parsed != Prediction(field=entry.get("field"), op=entry.get("op"), value=entry.get("value")):
        raise InputError(f"metadata resume.state.predictions: {shown(expr)} differs from its field/op/value")


def _check_progress(state: RunState, config: TrainConfig, epoch: int) -> None:
    """One record per epoch up to the file's, each advancing 1..steps_per_epoch steps, ending
    at the state's step within the plan, and the best epoch one of them."""
    where = "metadata resume.state"
    if epoch < 1 or len(state.epochs) != epoch:
        raise InputError(f"{where}.epochs: {len(state.epochs)} epoch record(s) in the file of epoch {epoch}")
    step = 0
    for number, record in enumerate(state.epochs, start=1):
        step = _check_epoch_record(record, number, step, config.steps_per_epoch)
    if state.step != step:
        raise InputError(f"{where}.step: {state.step}, but epoch {epoch} ended at step {step}")
    if state.step > config.num_steps:
        raise InputError(f"{where}.step: {state.step} is beyond the plan's num_steps {config.num_steps}")
    best = state.best_epoch
    if best is None:
        if state.best_val_loss is not None or state.best_checkpoint is not None:
            raise InputError(f"{where}.best_epoch: null beside a best val loss or checkpoint")
        return
    if not is_int(best) or not 1 <= best <= epoch:
        raise InputError(f"{where}.best_epoch: expected an epoch from 1 to {epoch}, got {shown(best)}")
    if state.best_val_loss != state.epochs[best - 1]["val_loss"]:
        raise InputError(f"{where}.best_val_loss: {shown(state.best_val_loss)} is not epoch {best}'s val loss")
    recorded = state.best_checkpoint
    if not isinstance(recorded, dict) or recorded.get("path") != BEST_CHECKPOINT or recorded.get("epoch") != best:
        raise InputError(f"{where}.best_checkpoint: expected {BEST_CHECKPOINT} of epoch {best}, got {shown(recorded)}")


def _check_epoch_record(record: Any, number: int, previous_step: int, steps_per_epoch: int) -> int:
    """Epoch `number`'s record checked; returns the step it ended at."""
    where = f"metadata resume.state.epochs[{number - 1}]"
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object, got {shown(record)}")
    if not is_int(record.get("epoch")) or record["epoch"] != number:
        raise InputError(f"{where}.epoch: expected {number}, got {shown(record.get('epoch'))}")
    step = record.get("step")
    if not is_int(step) or not previous_step < step <= previous_step + steps_per_epoch:
        raise InputError(f"{where}.step: expected {previous_step + 1} to {previous_step + steps_per_epoch} "
                         f"(steps_per_epoch {steps_per_epoch} after step {previous_step}), got {shown(step)}")
    for name in EPOCH_RECORD_NUMBERS:
        if finite_float(record.get(name)) is None:
            raise InputError(f"{where}.{name}: expected a finite number, got {shown(record.get(name))}")
    return step


def _check_resume_tensors(tensors: dict[str, torch.Tensor], model: ModelConfig) -> None:
    """Adam's two float32 moments for every weight, shaped as it, and the RNG states (U8)."""
    expected = {f"optimizer.{name}.{moment}": shape
                for name, shape in weight_shapes(model).items() for moment in ADAM_MOMENTS}
    rng_size = torch.get_rng_state().numel()
    for name, tensor in tensors.items():
        if name in expected:
            if tuple(tensor.shape) != expected[name] or tensor.dtype != torch.float32:
                raise InputError(f"tensor {name}: {tensor.dtype} {list(tensor.shape)}, the config implies "
                                 f"torch.float32 {list(expected[name])}")
        elif name in (RNG_CPU_TENSOR, RNG_CUDA_TENSOR):
            if tensor.dtype != torch.uint8 or tensor.dim() != 1 or \
                    (name == RNG_CPU_TENSOR and tensor.numel() != rng_size):
                raise InputError(f"tensor {name}: expected a 1-d U8 RNG state, got {tensor.dtype} "
                                 f"{list(tensor.shape)}")
        else:
            raise InputError(f"tensor {name}: not part of a resume file")
    missing = sorted((set(expected) | {RNG_CPU_TENSOR}) - set(tensors))
    if missing:
        raise InputError(f"tensor {missing[0]}: missing ({len(missing)} in all)")


# ---------------------------------------------------------------------------------------------
# The trainer


class _Stop(Exception):
    """Ends the loop; `reason` is the evidence's stop_reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        data_dir: Path,
        run_dir: Path,
        placement: Placement,
        compile_model: bool,
        progress: bool,
        state: RunState,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.run_dir = run_dir
        self.placement = placement
        self.progress = progress and placement.is_main
        self.state = state
        self.train_split = read_tokens(data_dir, "train")
        self.val_split = read_tokens(data_dir, "val")
        self.tokenizer_sha256 = self.train_split.tokenizer_sha256
        self.compiled = compile_model and placement.is_cuda
        # One CUDA graph per step needs a single process (DDP's collectives stay outside graphs).
        graphed = self.compiled and placement.world_size == 1
        self.device_info = _device_info(placement, self.compiled, graphed)
        self.corpus: dict[str, Any] = {}

        torch.manual_seed(config.seed)
        self.model = CausalLM(config.model).to(placement.device)
        self.optimizer, self.param_names = build_optimizer(
            self.model,
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            weight_decay=config.weight_decay,
            fused=placement.is_cuda and not graphed,  # the graphed step has its own update
        )
        self.run_step: Callable[..., tuple[torch.Tensor, torch.Tensor]]
        if graphed:
            self.run_step = GraphedTrainStep(self.model, self.optimizer, grad_clip=config.grad_clip)
        else:
            loss_module = training_model(
                self.model,
                ddp_device_ids=[placement.local_rank] if placement.is_cuda else None,
                distributed=placement.world_size > 1,
                compile_model=self.compiled,
            )
            self.run_step = functools.partial(
                train_step,
                loss_module,
                list(self.model.parameters()),
                self.optimizer,
                grad_clip=config.grad_clip,
                bf16=placement.is_cuda,
            )

    # -- evidence ------------------------------------------------------------------------------

    def write_summary(self, status: str, stop_reason: str | None, stop_message: str | None) -> None:
        if not self.placement.is_main:
            return
        evidence = build_evidence(
            self.state, self.config, self.device_info, self.corpus, status, stop_reason, stop_message
        )
        write_evidence(self.run_dir, EVIDENCE_NAME, evidence)

    # -- checkpoints ---------------------------------------------------------------------------

    def _producer(self, epoch: int) -> dict[str, Any]:
        return {
            "shipkit_version": __version__,
            "run_id": self.state.run_id,
            "epoch": epoch,
            "step": self.state.step,
        }

    def _apr_metadata(self, kind: str, epoch: int) -> dict[str, Any]:
        return {
            "kind": kind,
            "config": self.config.model.to_dict(),
            "tokenizer": {"file": TOKENIZER_FILE, "sha256": self.tokenizer_sha256},
            "producer": self._producer(epoch),
        }

    def save_epoch(self, record: dict[str, Any]) -> None:
        """Weights, metrics, best.apr and (last, so its presence marks a complete epoch) the
        resume companion; the previous resume companion is then removed."""
        epoch = record["epoch"]
        stem = self.run_dir / epoch_stem(epoch)
        weights = self.model.weights()
        write_apr(f"{stem}.apr", weights, self._apr_metadata("weights", epoch))
        checksum = sha256_file(f"{stem}.apr")
        write_json(
            f"{stem}.metadata.json",
            {**record, "run_id": self.state.run_id, "tensor_count": len(weights), "sha256": checksum},
        )
        if self.state.best_val_loss is None or record["val_loss"] < self.state.best_val_loss:
            _copy_atomic(Path(f"{stem}.apr"), self.run_dir / BEST_CHECKPOINT)
            self.state.best_val_loss = record["val_loss"]
            self.state.best_epoch = epoch
            self.state.best_checkpoint = {
                "path": BEST_CHECKPOINT,
                "epoch": epoch,
                "tensor_count": len(weights),
                "sha256": checksum,
            }
        self._save_resume(epoch)
        previous = self.run_dir / f"{epoch_stem(epoch - 1)}.resume.apr"
        previous.unlink(missing_ok=True)

    def _save_resume(self, epoch: int) -> None:
        tensors, adam_step = optimizer_tensors(self.optimizer, self.param_names)
        tensors = dict(tensors)
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        if self.placement.is_cuda:
            tensors["rng.torch_cuda"] = torch.cuda.get_rng_state(self.placement.device)
        metadata = self._apr_metadata("resume", epoch)
        metadata["resume"] = {
            "state": self.state.to_dict(),
            "adam_step": adam_step,
            "hyperparameters": self.config.to_dict(),
            "data_dir": str(self.data_dir.resolve()),
            "world_size": self.placement.world_size,
        }
        write_apr(self.run_dir / f"{epoch_stem(epoch)}.resume.apr", tensors, metadata)

    def restore(self, epoch: int) -> None:
        """Load the weights, Adam moments and RNG state saved after `epoch` (their metadata
        already checked by `read_resume_point`)."""
        weights = read_apr(self.run_dir / f"{epoch_stem(epoch)}.apr")
        self.model.load_weights({name: t.clone() for name, t in weights.tensors.items()})
        resume = read_apr(self.run_dir / f"{epoch_stem(epoch)}.resume.apr")
        saved = resume.metadata["resume"]
        load_optimizer_tensors(self.optimizer, self.param_names, resume.tensors, saved["adam_step"])
        torch.set_rng_state(resume.tensors["rng.torch_cpu"].clone())
        if self.placement.is_cuda and "rng.torch_cuda" in resume.tensors:
            torch.cuda.set_rng_state(resume.tensors["rng.torch_cuda"].clone(), self.placement.device)

    # -- the loop ------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.placement.is_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, val_windows: torch.Tensor) -> float:
        """Mean token loss over this rank's share of the validation windows, all ranks summed."""
        self.model.eval()
        rank_windows = val_windows[self.placement.rank :: self.placement.world_size]
        loss_sum, token_count = 0.0, 0
        for start in range(0, len(rank_windows), self.config.batch_size):
            batch = rank_windows[start : start + self.config.batch_size].to(self.placement.device)
            with self._autocast():
                logits = self.model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            loss_sum += loss.item()
            token_count += batch[:, 1:].numel()
        self.model.train()
        loss_sum, token_count = _all_reduce([loss_sum, float(token_count)], self.placement)
        return loss_sum / token_count

    def run(self) -> dict[str, Any]:
        config, placement = self.config, self.placement
        try:
            self.corpus = _corpus_stats(self.data_dir, self.train_split, self.val_split, 0)
            val_windows = validation_windows(self.val_split.shards, config.seq_len, config.val_tokens)
            self.corpus["val_eval_tokens"] = val_windows[:, 1:].numel()
            stream = TrainStream(
                train_subset(self.train_split.shards, config.seq_len, config.train_fraction, config.seed),
                config.seq_len,
                config.batch_size,
                config.seed,
                placement.rank,
                placement.world_size,
                cursor=self.state.cursor,
            )
            if self.state.predictions and not self.state.epochs:
                self.write_summary("running", None, None)  # the predictions, on file before step 1
            stop_reason, stop_message = self._train_epochs(stream, val_windows)
        except EmptyStreamError as error:
            self.write_summary("stopped", "empty-stream", str(error))
            raise
        except _Stop as stop:
            self.write_summary("stopped", stop.reason, str(stop))
            raise TrainingError(str(stop)) from None
        except KeyboardInterrupt:
            self.write_summary("stopped", "interrupted", "interrupted by the user")
            raise
        self.write_summary("completed", stop_reason, stop_message)
        return build_evidence(
            self.state, config, self.device_info, self.corpus, "completed", stop_reason, stop_message
        )

    def _train_epochs(self, stream: TrainStream, val_windows: torch.Tensor) -> tuple[str, str | None]:
        """Epochs until num_steps or, with a patience, until it runs out (checked before each
        epoch, so a resumed run that had used it up stays stopped); returns the stop reason
        and message."""
        config, placement = self.config, self.placement
        tokens_per_step = config.batch_size * config.seq_len * placement.world_size
        flops = flops_per_token(config.model, config.seq_len)
        bar = tqdm(
            total=config.num_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        with bar:
            while self.state.step < config.num_steps:
                if early_stop_due(self.state.epochs, config.early_stop_patience):
                    return EARLY_STOP, self._early_stop_message()
                epoch = len(self.state.epochs) + 1
                steps = min(config.steps_per_epoch, config.num_steps - self.state.step)
                epoch_start = time.perf_counter()
                record = self._train_epoch(epoch, steps, stream, bar, tokens_per_step, flops)
                self.state.cursor = stream.cursor
                val_loss = self.evaluate(val_windows)
                record["wall_seconds"] = round(time.perf_counter() - epoch_start, 3)
                self._finish_epoch(record, val_loss)
                if self.progress:
                    tqdm.write(
                        f"epoch {epoch}: train {record['train_loss']:.4f}  val {val_loss:.4f}  "
                        f"wraps {record['wraps']:.2f}  {record['tokens_per_second']:.0f} tok/s",
                        file=sys.stderr,
                    )
        return "completed", None

    def _early_stop_message(self) -> str:
        epochs, best = self.state.epochs, best_index(self.state.epochs)
        return (f"stopped early after epoch {len(epochs)} (step {self.state.step} of {self.config.num_steps}): "
                f"no new best val loss in {self.config.early_stop_patience} epoch(s) (early_stop_patience); "
                f"best {epochs[best]['val_loss']:.4f} at epoch {best + 1}")

    def _train_epoch(
        self, epoch: int, steps: int, stream: TrainStream, bar: tqdm, tokens_per_step: int, flops: float
    ) -> dict[str, Any]:
        config, placement = self.config, self.placement
        started = time.perf_counter()
        pending_losses: list[torch.Tensor] = []
        pending_norms: list[torch.Tensor] = []
        loss_sum, grad_norm_max, lr = 0.0, 0.0, 0.0
        for step_in_epoch in range(steps):
            lr = lr_at(self.state.step, config)
            batch = stream.next_batch().to(placement.device, non_blocking=True)
            loss, grad_norm = self.run_step(batch, lr=lr)
            self.state.step += 1
            pending_losses.append(loss)
            pending_norms.append(grad_norm)
            if len(pending_losses) == LOG_EVERY_STEPS or step_in_epoch == steps - 1:
                losses = torch.stack(pending_losses).float().cpu()
                norms = torch.stack(pending_norms).float().cpu()
                finite = torch.isfinite(losses)
                # Every rank must stop at the same check, or the others hang in the next collective.
                any_rank_bad, = _all_reduce([float(not finite.all())], placement, dist.ReduceOp.MAX)
                if any_rank_bad:
                    value = losses[~finite][0].item() if not finite.all() else "non-finite on another rank"
                    raise _Stop(
                        "non-finite-loss",
                        f"training loss became {value} by step {self.state.step} (epoch {epoch}); "
                        "lower lr or check the data",
                    )
                loss_sum += losses.sum().item()
                grad_norm_max = max(grad_norm_max, norms.max().item())
                bar.update(len(pending_losses))
                elapsed = time.perf_counter() - started
                bar.set_postfix(
                    loss=f"{losses[-1].item():.3f}",
                    tok_s=f"{(step_in_epoch + 1) * tokens_per_step / elapsed:.0f}",
                )
                pending_losses, pending_norms = [], []
        if placement.is_cuda:
            torch.cuda.synchronize(placement.device)
        train_seconds = time.perf_counter() - started
        loss_sum, = _all_reduce([loss_sum], placement)
        grad_norm_max, = _all_reduce([grad_norm_max], placement, dist.ReduceOp.MAX)
        train_loss = loss_sum / (steps * placement.world_size)
        tokens_per_second = steps * tokens_per_step / train_seconds
        mfu = flops * tokens_per_second / placement.world_size / H100_BF16_PEAK_FLOPS
        return {
            "epoch": epoch,
            "step": self.state.step,
            "train_loss": train_loss,
            "tokens_seen": self.state.step * tokens_per_step,
            "wraps": round(stream.wraps, 6),
            "grad_norm_max": grad_norm_max,
            "lr": lr,
            "tokens_per_second": round(tokens_per_second, 1),
            "mfu": round(mfu, 4) if placement.is_cuda else None,
        }

    def _finish_epoch(self, record: dict[str, Any], val_loss: float) -> None:
        epoch = record["epoch"]
        if not math.isfinite(val_loss):
            raise _Stop("non-finite-loss", f"validation loss became {val_loss} after epoch {epoch}")
        record.update(
            val_loss=val_loss,
            val_ppl=math.exp(min(val_loss, 700.0)),
            gap=val_loss - record["train_loss"],
            checkpoint=None,
        )
        previous = self.state.epochs[-1]["val_loss"] if self.state.epochs else None
        if is_divergence(previous, val_loss):
            self.state.epochs.append(dict(sorted(record.items())))
            raise _Stop(
                "divergence",
                f"validation loss diverged after epoch {epoch}: {val_loss:.4f} > "
                f"{DIVERGENCE_FACTOR:g} × {previous:.4f} (epoch {epoch - 1}); lower lr or raise warmup",
            )
        record["checkpoint"] = f"{epoch_stem(epoch)}.apr"
        self.state.epochs.append(dict(sorted(record.items())))
        if self.placement.is_main:
            self.save_epoch(record)
            self.write_summary("running", None, None)
        _barrier(self.placement)


# ---------------------------------------------------------------------------------------------
# Entry points


def _check_fresh_run_dir(run_dir: Path) -> None:
    for taken in (CKPT_DIR, "evidence"):
        if (run_dir / taken).exists():
            raise InputError(
                f"--out {run_dir}: already holds a run ({taken}/ exists); "
                "use --resume to continue it or choose another --out"
            )


def _tokenizer_vocab_size(tokenizer_path: Path) -> int:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as error:  # the Rust side raises its own Exception type
        reason = (str(error).splitlines() or [type(error).__name__])[0][:REASON_CHARS]
        raise InputError(f"{tokenizer_path}: the tokenizers library cannot load it ({reason})") from None
    return tokenizer.get_vocab_size(with_added_tokens=True)


def train(
    config: TrainConfig,
    data_dir: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    device: str = "auto",
    compile_model: bool = True,
    progress: bool = True,
    predictions: Sequence[str] = (),
) -> dict[str, Any]:
    """Train a new model on `data_dir` into `run_dir`; returns the training evidence.

    `config.model.vocab_size` is replaced by the tokenizer's vocabulary size. `predictions`
    (`"best_val_loss < 8.9"`, grammar in `shipkit.predict`) are recorded in the evidence before
    the first step and judged when the run ends. Raises InputError for a bad folder, option or
    prediction (before any training), TrainingError when the run stops early (the evidence,
    written first, says why). RUN_DIR is locked while the run writes it (`run_dir_lock`).
    """
    recorded = record_predictions(predictions)
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    tokenizer_path = data_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise InputError(f"--data {data_dir}: no {TOKENIZER_FILE} (run `shipkit tokenize encode` first)")
    config = apply_overrides(config, {"vocab_size": _tokenizer_vocab_size(tokenizer_path)})
    with _writer_lock(run_dir):
        _check_fresh_run_dir(run_dir)  # under the lock: no other run can start in between
        placement = setup_placement(device)
        if placement.is_main:
            _copy_atomic(tokenizer_path, run_dir / TOKENIZER_FILE)
        now = datetime.now(UTC).replace(microsecond=0)
        run_id = new_run_id(now)
        if placement.world_size > 1:
            shared = [run_id]
            dist.broadcast_object_list(shared, src=0)
            run_id = shared[0]
        state = RunState(run_id=run_id, date=now.isoformat().replace("+00:00", "Z"), predictions=recorded)
        try:
            return Trainer(config, data_dir, run_dir, placement, compile_model, progress, state).run()
        finally:
            _release(placement)


def resume(
    run_dir: str | os.PathLike[str],
    *,
    num_steps: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    compile_model: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Continue `run_dir` from its last saved epoch (optionally to a larger `num_steps`).

    On CPU with the same world size the continued losses equal an uninterrupted run's bit for
    bit. `data_dir` defaults to the folder the run was started with. The resume file is checked
    whole (`read_resume_point`) before anything is built, and RUN_DIR is locked while the run
    writes it (`run_dir_lock`).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"--resume {run_dir}: not a folder")
    with _writer_lock(run_dir):
        epoch = latest_resume_epoch(run_dir)
        point = read_resume_point(run_dir, epoch)
        config = point.config
        if num_steps is not None:
            config = apply_overrides(config, {"num_steps": num_steps})
        if point.state.step >= config.num_steps:
            raise InputError(
                f"--resume {run_dir}: the run already reached num_steps {config.num_steps}; "
                "pass a larger --num-steps to continue it"
            )
        data_dir = Path(data_dir) if data_dir is not None else point.data_dir
        placement = setup_placement(device)
        try:
            trainer = Trainer(config, data_dir, run_dir, placement, compile_model, progress, point.state)
            if trainer.tokenizer_sha256 != point.tokenizer_sha256:
                raise InputError(
                    f"--data {data_dir}: its tokenizer (sha256 {trainer.tokenizer_sha256[:12]}…) is not "
                    f"the one the run was trained with ({point.tokenizer_sha256[:12]}…)"
                )
            trainer.restore(epoch)
            return trainer.run()
        finally:
            _release(placement)
