"""TRAIN gates: the run completed, its val loss fell, converged, shows no memorization and
counted its passes over the train split, and meets the contract's `[train]` thresholds; all read
from the training summary (an imported model's are PARTIAL: it was not trained here)."""

from __future__ import annotations

import math
from typing import Any

from shipkit.contract import Threshold
from shipkit.evidence import DISCHARGED, FAILED, PARTIAL
from shipkit.gates.view import IMPORTED, TRAINING, Gate, RunView, ref

# Per training-summary verdict: what it makes of the gate.
CONVERGENCE_STATUS = {"converging": DISCHARGED, "plateaued": DISCHARGED, "insufficient-epochs": PARTIAL,
                      "worsening": FAILED, "diverged": FAILED}
MEMORIZATION_STATUS = {"healthy": DISCHARGED, "overfitting": FAILED, "memorization-suspect": FAILED}
TRAIN_GATES = ("train.completed", "train.val_loss_decreasing", "train.convergence", "train.memorization",
               "train.wraps")


def train_gates(view: RunView) -> list[Gate]:
    thresholds = {m: t for m, t in view.contract.train.thresholds.items() if m != "wraps"}
    ids = [*TRAIN_GATES, *(f"train.{metric}" for metric in thresholds)]
    if view.training.data is None and view.training.problem is None and view.source is not None:
        upstream = ref(view.checkpoint, "producer.source.base_model", view.source.get("base_model"))
        return [Gate(gate_id, "TRAIN", PARTIAL, IMPORTED, [upstream]) for gate_id in ids]
    if view.training.data is None:
        detail = view.training.problem or f"{TRAINING} not found: run `shipkit train`"
        return [Gate(gate_id, "TRAIN", FAILED, detail) for gate_id in ids]
    training = view.training.data
    summary, epochs = training["summary"], training["epochs"]
    gates = [_completed(summary), _val_loss_decreasing(summary, epochs)]
    convergence = summary["convergence"]
    gates.append(Gate("train.convergence", "TRAIN", CONVERGENCE_STATUS[convergence],
                      f"last two val losses: {convergence}", [ref(TRAINING, "summary.convergence", convergence)]))
    gates.append(_training_regime(summary["memorization"], view))
    gates.append(_wraps(epochs, view.contract.train.thresholds.get("wraps")))
    for metric, threshold in thresholds.items():
        gates.append(_train_threshold(metric, threshold, training))
    return gates


def _training_regime(regime: dict[str, Any], view: RunView) -> Gate:
    """`healthy` passes; `overfitting` and `memorization-suspect` fail unless the released
    checkpoint is the best-val epoch from before a turn (then PARTIAL, saying so; a memorization
    signature has no turn: its best val loss is the artifact); the regimes that cannot judge yet
    (`too-early`, `split-shift`) are PARTIAL with their reason."""
    verdict = regime["verdict"]
    evidence = [ref(TRAINING, "summary.memorization.verdict", verdict),
                ref(TRAINING, "summary.memorization.best_epoch", regime.get("best_epoch"))]
    status = MEMORIZATION_STATUS.get(verdict, PARTIAL)
    detail = f"{verdict}: {regime['reason']}"
    if status == FAILED:
        released = ((view.metadata or {}).get("producer") or {}).get("epoch")
        turn = regime.get("turn_epoch")
        evidence.append(ref(view.checkpoint, "metadata.producer.epoch", released))
        if released is not None and released == regime.get("best_epoch") and turn is not None and released < turn:
            status = PARTIAL
            detail += f"; the released checkpoint is epoch {released}, the best val epoch before the turn"
    return Gate("train.memorization", "TRAIN", status, detail, evidence)


def _completed(summary: dict[str, Any]) -> Gate:
    evidence = [ref(TRAINING, "summary.stop_reason", summary["stop_reason"])]
    if summary["stop_reason"] == "completed":
        return Gate("train.completed", "TRAIN", DISCHARGED, "the run reached num_steps", evidence)
    if summary["stop_reason"] == "early_stop":  # patience ran out: a planned end, not a failure
        return Gate("train.completed", "TRAIN", DISCHARGED, f"stopped early: {summary['stop_message']}", evidence)
    if summary["status"] == "running":
        return Gate("train.completed", "TRAIN", PARTIAL, "the run has not finished (status running)", evidence)
    return Gate("train.completed", "TRAIN", FAILED, f"the run stopped: {summary['stop_message']}", evidence)


def _val_loss_decreasing(summary: dict[str, Any], epochs: list[dict[str, Any]]) -> Gate:
    if len(epochs) < 2:
        return Gate("train.val_loss_decreasing", "TRAIN", PARTIAL, f"{len(epochs)} epoch(s): nothing to compare",
                    [ref(TRAINING, "summary.epochs_completed", len(epochs))])
    first, best = epochs[0]["val_loss"], summary["best_val_loss"]
    evidence = [ref(TRAINING, "epochs[0].val_loss", first), ref(TRAINING, "summary.best_val_loss", best)]
    if best < first:
        return Gate("train.val_loss_decreasing", "TRAIN", DISCHARGED,
                    f"best val loss {best:.4f} < epoch 1's {first:.4f}", evidence)
    return Gate("train.val_loss_decreasing", "TRAIN", FAILED,
                f"val loss never fell below epoch 1's {first:.4f}", evidence)


def _wraps(epochs: list[dict[str, Any]], threshold: Threshold | None) -> Gate:
    if not epochs:
        return Gate("train.wraps", "TRAIN", PARTIAL, "no epoch recorded")
    wraps = epochs[-1]["wraps"]
    evidence = [ref(TRAINING, f"epochs[{len(epochs) - 1}].wraps", wraps)]
    if threshold is None:
        return Gate("train.wraps", "TRAIN", DISCHARGED, f"{wraps:.2f} passes over the train split, counted", evidence)
    return _threshold_gate("train.wraps", "TRAIN", wraps, threshold, evidence)


def _train_threshold(metric: str, threshold: Threshold, training: dict[str, Any]) -> Gate:
    summary = training["summary"]
    if metric == "best_val_loss_vs_uniform":
        best, vocab = summary["best_val_loss"], training["model"]["vocab_size"]
        value = None if best is None else best / math.log(vocab)
        evidence = [ref(TRAINING, "summary.best_val_loss", best), ref(TRAINING, "model.vocab_size", vocab)]
    else:
        value = summary[metric]
        evidence = [ref(TRAINING, f"summary.{metric}", value)]
    if value is None:
        return Gate(f"train.{metric}", "TRAIN", PARTIAL, "not measured yet (no epoch)", evidence)
    return _threshold_gate(f"train.{metric}", "TRAIN", value, threshold, evidence)


def _threshold_gate(gate_id: str, category: str, value: float, threshold: Threshold,
                    evidence: list[dict[str, Any]]) -> Gate:
    sign = "<=" if threshold.direction == "max" else ">="
    passes = threshold.passes(value)
    verb = "holds" if passes else "violated"
    detail = f"{value:.6g} {sign} {threshold.limit:g} {verb}: {threshold.reason}"
    return Gate(gate_id, category, DISCHARGED if passes else FAILED, detail, evidence)
