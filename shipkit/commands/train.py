"""`shipkit train` and `shipkit compare`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from shipkit.commands.common import emit, flag_spelling, json_option
from shipkit.errors import InputError
from shipkit.fsutil import check_folder_target
from shipkit.train.presets import (  # imports no torch: the --preset choices
    PRESETS,
    apply_overrides,
    get_preset,
    parse_set_options,
)

DEFAULT_PRESET = "tiny"


def _render_summary(evidence: dict[str, Any]) -> str:
    summary = evidence["summary"]
    best = summary["best_checkpoint"]
    verdict = summary["memorization"]
    turn = f", turned at epoch {verdict['turn_epoch']}" if verdict["turn_epoch"] else ""
    lines = [
        f"run {evidence['run_id']}: {summary['epochs_completed']} epochs, "
        f"{summary['steps_completed']} steps, {summary['stop_reason']}",
        *([summary["stop_message"]] if summary["stop_message"] else []),
        f"final val loss {summary['final_val_loss']:.4f}, best {summary['best_val_loss']:.4f} "
        f"(epoch {summary['best_epoch']}, {best['path']})",
        f"convergence: {summary['convergence']}; verdict: {verdict['verdict']}{turn} ({verdict['reason']})",
    ]
    lines += [f"prediction {p['expr']}: {p['verdict']} (observed {p['observed']})" for p in evidence["predictions"]]
    return "\n".join(lines)


@click.command("train")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), help="TOKENS_DIR from `shipkit tokenize encode`.")
@click.option("--preset", default=None, type=click.Choice(sorted(PRESETS)), help=f"Starting configuration (default {DEFAULT_PRESET}).")
@click.option("--num-steps", type=click.IntRange(min=1), default=None, help="Total optimizer steps.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None, help="Optimizer steps per epoch (checkpoint + validation after each).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Sequences per step and rank.")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Tokens per sequence.")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--seed", type=int, default=None, help="Seed of the initialisation and the data order.")
@click.option("--early-stop-patience", type=click.IntRange(min=0), default=None, metavar="N",
              help="Stop after N epochs without a new best val loss (0: never; the preset's "
                   "early_stop_patience by default).")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE", help="Override any config field, e.g. --set hidden_size=256 (repeatable).")
@click.option("--out", "run_dir", type=click.Path(path_type=Path), help="RUN_DIR to create.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), default=None, help="Continue this RUN_DIR from its last saved epoch.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-compile", is_flag=True, help="On CUDA: no torch.compile and no one-graph step (autocast + fused AdamW, eager).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--predict", "predictions", multiple=True, metavar="EXPR",
              help='A falsifiable prediction recorded before training and judged at the end, '
                   'e.g. "best_val_loss < 8.911" (repeatable; docs/gates.md).')
@json_option
def train_command(
    data_dir: Path | None,
    preset: str | None,
    num_steps: int | None,
    steps_per_epoch: int | None,
    batch_size: int | None,
    seq_len: int | None,
    lr: float | None,
    seed: int | None,
    early_stop_patience: int | None,
    set_items: tuple[str, ...],
    run_dir: Path | None,
    resume_dir: Path | None,
    device: str,
    no_compile: bool,
    quiet: bool,
    predictions: tuple[str, ...],
    as_json: bool,
) -> None:
    """Train a model from scratch on a token folder (or continue one with --resume).

    Writes RUN_DIR/ckpt/epoch-NNN.apr (+ .metadata.json, + resume state), ckpt/best.apr,
    tokenizer.json and evidence/training-summary.json. Multi-GPU: run it under
    `torchrun --nproc-per-node K -m shipkit train ...`.
    """
    from shipkit.train import resume, train

    explicit = {
        "num_steps": num_steps,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "seed": seed,
        "early_stop_patience": early_stop_patience,
    }
    with flag_spelling(overrides="--set"):
        overrides: dict[str, Any] = parse_set_options(set_items)
    # The library's errors name the field at fault; on this command line each field came from a flag.
    flags = {"data_dir": "--data", "device": "--device", "preset": "--preset", "predict": "--predict",
             **{name: f"--set {name}" for name in overrides},
             **{name: f"--{name.replace('_', '-')}" for name, value in explicit.items() if value is not None}}
    overrides.update({key: value for key, value in explicit.items() if value is not None})
    for option, folder in (("--out", run_dir), ("--resume", resume_dir)):
        if folder is not None:
            check_folder_target(folder, option)
    if resume_dir is not None:
        changed = sorted(set(overrides) - {"num_steps"})
        if predictions:
            raise InputError("--predict: predictions are recorded before a run starts, not on --resume")
        if preset or changed or (run_dir and run_dir != resume_dir):
            raise InputError(
                "--resume continues with the run's own configuration: only --num-steps, --data, "
                f"--device and --no-compile may be given (got {', '.join(changed or ['--preset/--out'])})"
            )
        with flag_spelling(**(flags | {"run_dir": "--resume"})):
            evidence = resume(
                resume_dir,
                num_steps=int(overrides["num_steps"]) if "num_steps" in overrides else None,
                data_dir=data_dir,
                device=device,
                compile_model=not no_compile,
                progress=not quiet,
            )
    else:
        if data_dir is None or run_dir is None:
            raise InputError("train: --data and --out are required (or --resume RUN_DIR)")
        with flag_spelling(**(flags | {"run_dir": "--out"})):
            config = apply_overrides(get_preset(preset or DEFAULT_PRESET), overrides)
            evidence = train(
                config, data_dir, run_dir, device=device, compile_model=not no_compile, progress=not quiet,
                predictions=predictions,
            )
    if int(os.environ.get("RANK", "0")) == 0:
        emit(evidence, as_json, _render_summary)


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, metavar="FILE.png",
              help="Also write the runs' loss curves side by side, titled with their verdicts, to this PNG.")
@json_option
def compare_command(run_dirs: tuple[Path, ...], plot_path: Path | None, as_json: bool) -> None:
    """Side-by-side table of runs' epochs (train, val, gap, wraps) and their verdicts."""
    from shipkit.train.compare import compare_runs, render_comparison

    with flag_spelling(plot="--plot"):
        comparison = compare_runs(list(run_dirs), plot=plot_path)
    emit(comparison, as_json, render_comparison)


commands = [train_command, compare_command]
