"""The trainer: from a token folder to a run folder with checkpoints and training evidence.

An epoch is `steps_per_epoch` optimizer steps; after each, the model is scored on the fixed
validation set, `ckpt/epoch-NNN.apr` (weights), `ckpt/epoch-NNN.metadata.json` (metrics) and
`ckpt/epoch-NNN.resume.apr` (optimizer moments, RNG, data cursor, history) are written, `best.apr`
is refreshed, and `evidence/training-summary.json` is rewritten. Layout and formulas:
docs/training.md; evidence fields: docs/evidence.md. Starting and continuing a run:
`shipkit.train.entry`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from shipkit import __version__
from shipkit.apr import read_apr, write_apr
from shipkit.errors import TrainingError
from shipkit.evidence import TRAINING_EVIDENCE, write_evidence
from shipkit.fsutil import sha256_file, write_json
from shipkit.layout import RunDir
from shipkit.model import CausalLM, flops_per_token
from shipkit.tokenize import read_tokens
from shipkit.train.data import (
    EmptyStreamError,
    TrainStream,
    train_subset,
    validation_windows,
)
from shipkit.train.graphed_step import GraphedTrainStep
from shipkit.train.placement import (
    Placement,
    all_reduce,
    barrier,
    device_info,
)
from shipkit.train.presets import TrainConfig
from shipkit.train.resume_file import (
    RNG_CPU_TENSOR,
    RNG_CUDA_TENSOR,
)
from shipkit.train.run_folder import copy_atomic
from shipkit.train.step import (
    build_optimizer,
    load_optimizer_tensors,
    optimizer_tensors,
    train_step,
    training_model,
)
from shipkit.train.step import lr_at as schedule_lr_at
from shipkit.train.summary import (
    RunState,
    build_evidence,
    corpus_stats,
)
from shipkit.train.verdicts import (
    DIVERGENCE_FACTOR,
    EARLY_STOP,
    best_index,
    early_stop_due,
    is_divergence,
)

H100_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100 SXM, the MFU denominator
LOG_EVERY_STEPS = 10  # how often losses are pulled from the device (each pull is a sync)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) under `config`'s schedule."""
    return schedule_lr_at(
        step,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        num_steps=config.num_steps,
        min_lr_ratio=config.min_lr_ratio,
    )


class _Stop(Exception):
    """Ends the loop; `reason` is the evidence's stop_reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Trainer:
    """One process's share of a run: the model, its optimizer and step, the epoch loop,
    validation, the epoch files and the evidence. `train` builds it fresh; `resume` builds it and
    calls `restore` before `run`."""

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
        self.files = RunDir(run_dir)
        self.placement = placement
        self.progress = progress and placement.is_main
        self.state = state
        self.train_split = read_tokens(data_dir, "train")
        self.val_split = read_tokens(data_dir, "val")
        self.tokenizer_sha256 = self.train_split.tokenizer_sha256
        self.compiled = compile_model and placement.is_cuda
        # One CUDA graph per step needs a single process (DDP's collectives stay outside graphs).
        graphed = self.compiled and placement.world_size == 1
        self.device_info = device_info(placement, self.compiled, graphed)
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
        write_evidence(self.run_dir, TRAINING_EVIDENCE, evidence)

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
            "tokenizer": {"file": RunDir.TOKENIZER, "sha256": self.tokenizer_sha256},
            "producer": self._producer(epoch),
        }

    def save_epoch(self, record: dict[str, Any]) -> None:
        """Weights, metrics, best.apr and (last, so its presence marks a complete epoch) the
        resume companion; the previous resume companion is then removed."""
        epoch = record["epoch"]
        weights_path = self.files.epoch(epoch)
        weights = self.model.weights()
        write_apr(weights_path, weights, self._apr_metadata("weights", epoch))
        checksum = sha256_file(weights_path)
        write_json(
            self.files.epoch_metadata(epoch),
            {**record, "run_id": self.state.run_id, "tensor_count": len(weights), "sha256": checksum},
        )
        if self.state.best_val_loss is None or record["val_loss"] < self.state.best_val_loss:
            copy_atomic(weights_path, self.files.best)
            self.state.best_val_loss = record["val_loss"]
            self.state.best_epoch = epoch
            self.state.best_checkpoint = {
                "path": RunDir.BEST,
                "epoch": epoch,
                "tensor_count": len(weights),
                "sha256": checksum,
            }
        self._save_resume(epoch)
        self.files.resume(epoch - 1).unlink(missing_ok=True)

    def _save_resume(self, epoch: int) -> None:
        tensors, adam_step = optimizer_tensors(self.optimizer, self.param_names)
        tensors = dict(tensors)
        tensors[RNG_CPU_TENSOR] = torch.get_rng_state()
        if self.placement.is_cuda:
            tensors[RNG_CUDA_TENSOR] = torch.cuda.get_rng_state(self.placement.device)
        metadata = self._apr_metadata("resume", epoch)
        metadata["resume"] = {
            "state": self.state.to_dict(),
            "adam_step": adam_step,
            "hyperparameters": self.config.to_dict(),
            "data_dir": str(self.data_dir.resolve()),
            "world_size": self.placement.world_size,
        }
        write_apr(self.files.resume(epoch), tensors, metadata)

    def restore(self, epoch: int) -> None:
        """Load the weights, Adam moments and RNG state saved after `epoch` (their metadata
        already checked by `read_resume_point`)."""
        weights = read_apr(self.files.epoch(epoch))
        self.model.load_weights({name: t.clone() for name, t in weights.tensors.items()})
        resume = read_apr(self.files.resume(epoch))
        saved = resume.metadata["resume"]
        load_optimizer_tensors(self.optimizer, self.param_names, resume.tensors, saved["adam_step"])
        torch.set_rng_state(resume.tensors[RNG_CPU_TENSOR].clone())
        if self.placement.is_cuda and RNG_CUDA_TENSOR in resume.tensors:
            torch.cuda.set_rng_state(resume.tensors[RNG_CUDA_TENSOR].clone(), self.placement.device)

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
        loss_sum, token_count = all_reduce([loss_sum, float(token_count)], self.placement)
        return loss_sum / token_count

    def run(self) -> dict[str, Any]:
        config, placement = self.config, self.placement
        try:
            self.corpus = corpus_stats(self.data_dir, self.train_split, self.val_split, 0)
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
                any_rank_bad, = all_reduce([float(not finite.all())], placement, dist.ReduceOp.MAX)
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
        loss_sum, = all_reduce([loss_sum], placement)
        grad_norm_max, = all_reduce([grad_norm_max], placement, dist.ReduceOp.MAX)
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
        record["checkpoint"] = RunDir.epoch_file(epoch)
        self.state.epochs.append(dict(sorted(record.items())))
        if self.placement.is_main:
            self.save_epoch(record)
            self.write_summary("running", None, None)
        barrier(self.placement)
