"""What the loss curves say: the run's verdict (healthy, too-early, split-shift, overfitting,
memorization-suspect), its convergence, divergence and the early-stop rule.

Pure functions of the epoch records (`train_loss`, `val_loss`, `gap`, `wraps`, as the trainer
writes them), so the evidence of a resumed run is judged exactly as an uninterrupted one. Rules
and precedence: docs/evidence.md, "summary.memorization".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

DIVERGENCE_FACTOR = 2.0  # val[n] > 2 × val[n−1] stops the run (issue 5)
CONVERGENCE_TOLERANCE = 0.01  # relative val change between the last two epochs called a plateau
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
