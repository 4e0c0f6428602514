"""The training evidence (`evidence/training-summary.json`): the run's state and the document
built from it after every epoch and when the run ends. Fields: docs/evidence.md.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from shipkit import __version__
from shipkit.config import parameter_count
from shipkit.predict import judge_predictions
from shipkit.tokenize import read_manifest
from shipkit.train.presets import TrainConfig
from shipkit.train.verdicts import (
    EARLY_STOP,
    convergence_status,
    epochs_without_improvement,
    training_verdict,
)


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


def corpus_stats(data_dir: Path, train_split: Any, val_split: Any, val_eval_tokens: int) -> dict[str, Any]:
    """The evidence's `corpus`: the token folder's splits as the run reads them."""
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
