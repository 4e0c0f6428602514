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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
from shipkit.model import CausalLM, flops_per_token, parameter_count
from shipkit.predict import judge_predictions, record_predictions
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


def memorization_verdict(epochs: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """The verdict on the last epoch; rules in docs/evidence.md."""
    if not epochs:
        return {
            "verdict": "inconclusive",
            "gap": None,
            "wraps": 0.0,
            "threshold": threshold,
            "reason": "no completed epoch",
        }
    last = epochs[-1]
    gap, wraps = last["gap"], last["wraps"]
    numbers = f"gap val − train = {gap:+.3f} nats at {wraps:.2f} wraps (threshold {threshold})"
    if wraps > 1 and gap < -threshold:
        verdict = "memorization-suspect"
        reason = f"val loss below train loss after more than one pass: {numbers}"
    elif abs(gap) <= threshold:
        verdict = "healthy"
        reason = f"val and train loss agree: {numbers}"
    elif gap < 0:
        verdict = "inconclusive"
        reason = f"val below train within the first pass, expected while loss falls: {numbers}"
    else:
        verdict = "inconclusive"
        reason = f"val above train by more than the threshold (overfitting or split shift?): {numbers}"
    return {"verdict": verdict, "gap": gap, "wraps": wraps, "threshold": threshold, "reason": reason}


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
        "memorization": memorization_verdict(state.epochs, config.memorization_threshold),
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
        """Load the weights, Adam moments and RNG state saved after `epoch`."""
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
                self.train_split.shards,
                config.seq_len,
                config.batch_size,
                config.seed,
                placement.rank,
                placement.world_size,
                cursor=self.state.cursor,
            )
            if self.state.predictions and not self.state.epochs:
                self.write_summary("running", None, None)  # the predictions, on file before step 1
            self._train_epochs(stream, val_windows)
        except EmptyStreamError as error:
            self.write_summary("stopped", "empty-stream", str(error))
            raise
        except _Stop as stop:
            self.write_summary("stopped", stop.reason, str(stop))
            raise TrainingError(str(stop)) from None
        except KeyboardInterrupt:
            self.write_summary("stopped", "interrupted", "interrupted by the user")
            raise
        self.write_summary("completed", "completed", None)
        return build_evidence(
            self.state, config, self.device_info, self.corpus, "completed", "completed", None
        )

    def _train_epochs(self, stream: TrainStream, val_windows: torch.Tensor) -> None:
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

    return Tokenizer.from_file(str(tokenizer_path)).get_vocab_size(with_added_tokens=True)


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
    written first, says why).
    """
    recorded = record_predictions(predictions)
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    tokenizer_path = data_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise InputError(f"--data {data_dir}: no {TOKENIZER_FILE} (run `shipkit tokenize encode` first)")
    _check_fresh_run_dir(run_dir)
    config = apply_overrides(config, {"vocab_size": _tokenizer_vocab_size(tokenizer_path)})
    placement = setup_placement(device)
    if placement.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
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
    bit. `data_dir` defaults to the folder the run was started with.
    """
    run_dir = Path(run_dir)
    epoch = latest_resume_epoch(run_dir)
    saved = read_apr(run_dir / f"{epoch_stem(epoch)}.resume.apr", verify=False).metadata
    resume_meta = saved["resume"]
    config = TrainConfig.from_dict(resume_meta["hyperparameters"], saved["config"])
    if num_steps is not None:
        config = apply_overrides(config, {"num_steps": num_steps})
    state_fields = dict(resume_meta["state"])
    state = RunState(**state_fields)
    if state.step >= config.num_steps:
        raise InputError(
            f"--resume {run_dir}: the run already reached num_steps {config.num_steps}; "
            "pass a larger --num-steps to continue it"
        )
    data_dir = Path(data_dir) if data_dir is not None else Path(resume_meta["data_dir"])
    placement = setup_placement(device)
    try:
        trainer = Trainer(config, data_dir, run_dir, placement, compile_model, progress, state)
        if trainer.tokenizer_sha256 != saved["tokenizer"]["sha256"]:
            raise InputError(
                f"--data {data_dir}: its tokenizer (sha256 {trainer.tokenizer_sha256[:12]}…) is not "
                f"the one the run was trained with ({saved['tokenizer']['sha256'][:12]}…)"
            )
        trainer.restore(epoch)
        return trainer.run()
    finally:
        _release(placement)
