"""`shipkit compare`: several runs' training evidence side by side, with their verdicts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shipkit.errors import InputError
from shipkit.evidence import read_evidence

EPOCH_COLUMNS = ("train_loss", "val_loss", "gap", "wraps")


def compare_runs(run_dirs: list[str | os.PathLike[str]]) -> dict[str, Any]:
    """Read each run's training evidence; returns `{"runs": [...]}` with, per run, its label,
    run_id, per-epoch train/val/gap/wraps rows and the summary verdicts."""
    if not run_dirs:
        raise InputError("compare: give at least one RUN_DIR")
    runs = []
    for run_dir in run_dirs:
        evidence = read_evidence(run_dir, "training-summary")
        summary = evidence["summary"]
        runs.append(
            {
                "run_dir": str(run_dir),
                "label": Path(run_dir).name or str(run_dir),
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
    return {"runs": runs}


def _cell(epoch: dict[str, Any] | None) -> list[str]:
    if epoch is None:
        return ["", "", "", ""]
    return [
        f"{epoch['train_loss']:.4f}",
        f"{epoch['val_loss']:.4f}",
        f"{epoch['gap']:+.4f}",
        f"{epoch['wraps']:.2f}",
    ]


def render_comparison(result: dict[str, Any]) -> str:
    """A fixed-width table: one row per epoch, four columns (train, val, gap, wraps) per run,
    followed by one verdict line per run."""
    runs = result["runs"]
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
    for run in runs:
        best = "-" if run["best_val_loss"] is None else f"{run['best_val_loss']:.4f} (epoch {run['best_epoch']})"
        lines.append(
            f"{run['label']}: {run['memorization']['verdict']}, {run['convergence']}, "
            f"{run['stop_reason'] or run['status']}, best val {best} — {run['memorization']['reason']}"
        )
    return "\n".join(lines)
