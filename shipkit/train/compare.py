"""`shipkit compare`: several runs' training evidence side by side, with their verdicts, and
their loss curves side by side in one PNG."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipkit.errors import InputError
from shipkit.evidence import TRAINING_EVIDENCE, read_evidence
from shipkit.fsutil import atomic_write, check_folder_target

EPOCH_COLUMNS = ("train_loss", "val_loss", "gap", "wraps")
PANEL_INCHES = (4.8, 3.6)  # one run's panel; the figure is one panel per run, side by side
PLOT_DPI = 100


@dataclass(frozen=True)
class Comparison:
    """Per run, in the order given: its run_dir, label, run_id, per-epoch train/val/gap/wraps rows
    and the summary's verdicts; `plot` is the PNG of their loss curves, when one was asked for."""

    runs: list[dict[str, Any]]
    plot: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, **({} if self.plot is None else {"plot": str(self.plot)})}


def compare_runs(run_dirs: list[str | os.PathLike[str]], *,
                 plot: str | os.PathLike[str] | None = None) -> Comparison:
    """Read each run's training evidence and, when `plot` names a PNG file, draw the runs' loss
    curves into it (`write_comparison_plot`). Raises InputError for a run without training
    evidence and for a `plot` that is a folder or lies under a file."""
    if not run_dirs:
        raise InputError("compare: give at least one RUN_DIR")
    runs = []
    for run_dir, label in zip(run_dirs, run_labels(run_dirs), strict=True):
        evidence = read_evidence(run_dir, TRAINING_EVIDENCE)
        summary = evidence["summary"]
        runs.append(
            {
                "run_dir": str(run_dir),
                "label": label,
                "run_id": evidence["run_id"],
                "epochs": [
                    {"epoch": epoch["epoch"], **{key: epoch[key] for key in EPOCH_COLUMNS}}
                    for epoch in evidence["epochs"]
                ],
                "status": summary["status"],
                "stop_reason": summary["stop_reason"],
                "best_val_loss": summary["best_val_loss"],
                "best_epoch": summary["best_epoch"],
                "convergence": summary["convergence"],
                "memorization": summary["memorization"],
            }
        )
    if plot is None:
        return Comparison(runs)
    plot = Path(plot)
    if plot.is_dir():
        raise InputError(f"plot {plot}: is a folder; give a file name such as loss.png")
    check_folder_target(plot.parent, "plot")
    plot.parent.mkdir(parents=True, exist_ok=True)
    return Comparison(runs, write_comparison_plot(runs, plot))


def run_labels(run_dirs: list[str | os.PathLike[str]]) -> list[str]:
    """Each folder's last path component, or as many trailing components as tell the runs apart
    (`quarter/run`, `full/run` for the run folders `shipkit ship` makes)."""
    parts = [Path(os.path.abspath(run_dir)).parts for run_dir in run_dirs]
    depth = 1
    while len({part[-depth:] for part in parts}) < len(set(parts)) and depth < max(map(len, parts)):
        depth += 1
    return ["/".join(part[-depth:]) for part in parts]


def _cell(epoch: dict[str, Any] | None) -> list[str]:
    if epoch is None:
        return ["", "", "", ""]
    return [
        f"{epoch['train_loss']:.4f}",
        f"{epoch['val_loss']:.4f}",
        f"{epoch['gap']:+.4f}",
        f"{epoch['wraps']:.2f}",
    ]


def _verdict_line(run: dict[str, Any]) -> str:
    verdict = run["memorization"]
    turn = f" (turned at epoch {verdict['turn_epoch']})" if verdict.get("turn_epoch") else ""
    best = "-" if run["best_val_loss"] is None else f"{run['best_val_loss']:.4f} (epoch {run['best_epoch']})"
    return (f"{run['label']}: {verdict['verdict']}{turn}, {run['convergence']}, "
            f"{run['stop_reason'] or run['status']}, best val {best} — {verdict['reason']}")


def render_comparison(comparison: Comparison) -> str:
    """A fixed-width table: one row per epoch, four columns (train, val, gap, wraps) per run,
    followed by one verdict line per run."""
    runs = comparison.runs
    header_top = ["", *[label for run in runs for label in (run["label"], "", "", "")]]
    header = ["epoch", *["train", "val", "gap", "wraps"] * len(runs)]
    rows = [header_top, header]
    epoch_count = max((len(run["epochs"]) for run in runs), default=0)
    for index in range(epoch_count):
        row = [str(index + 1)]
        for run in runs:
            row += _cell(run["epochs"][index] if index < len(run["epochs"]) else None)
        rows.append(row)
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.append("")
    lines += [_verdict_line(run) for run in runs]
    if comparison.plot is not None:
        lines.append(f"loss curves: {comparison.plot}")
    return "\n".join(lines)


def write_comparison_plot(runs: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Each of `runs` (`Comparison.runs`): train and val loss per epoch, one panel per run on a
    shared loss axis, titled with its verdict; the best epoch is marked and the epochs from the
    turn on are shaded. Tick labels give the epoch and, below it, the passes over the train split.
    PNG, matplotlib Agg, no timestamp (reruns match)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(PANEL_INCHES[0] * len(runs), PANEL_INCHES[1]), dpi=PLOT_DPI)
    panels = figure.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for axes, run in zip(panels, runs, strict=True):
        _plot_run(axes, run)
    panels[0].set_ylabel("loss (nats/token)")
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", metadata={"Software": None})
    return path


def _plot_run(axes: Any, run: dict[str, Any]) -> None:
    epochs = run["epochs"]
    numbers = [epoch["epoch"] for epoch in epochs]
    verdict = run["memorization"]
    axes.plot(numbers, [epoch["train_loss"] for epoch in epochs], marker="o", label="train (epoch mean)")
    axes.plot(numbers, [epoch["val_loss"] for epoch in epochs], marker="s", label="val (end of epoch)")
    if run["best_epoch"] is not None:
        axes.axvline(run["best_epoch"], color="grey", linestyle=":", label="best val epoch")
    if verdict.get("turn_epoch"):
        axes.axvspan(verdict["turn_epoch"] - 0.5, numbers[-1] + 0.5, color="tab:red", alpha=0.08,
                     label=f"{verdict['verdict']} from the turn")
    axes.set_xlim(numbers[0] - 0.5, numbers[-1] + 0.5)
    axes.set_xticks(numbers, [f"{epoch['epoch']}\n{epoch['wraps']:.1f}" for epoch in epochs])
    axes.set_xlabel("epoch / passes over the train split")
    axes.set_title(f"{run['label']}: {verdict['verdict']}", fontsize="medium")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
