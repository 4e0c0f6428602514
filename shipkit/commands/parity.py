"""`shipkit parity`: the parity gate between a base model and its quantized GGUF(s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from shipkit.commands.common import emit, flag_spelling, json_option
from shipkit.errors import GateFailed
from shipkit.evidence import PASS, SKIPPED
from shipkit.fsutil import check_folder_target
from shipkit.parity.options import DEFAULT_TOKEN_BUDGET, LLAMA_CPP, TORCH, ParityOptions

ENGINE_CHOICES = {"torch": (TORCH,), "llama.cpp": (LLAMA_CPP,), "both": (TORCH, LLAMA_CPP)}
LADDER_NAME_WIDTH = 28  # a file column wide enough for "<model>-Q4_K_M.gguf" names
METRIC_COLUMNS = ("kl_mean", "kl_p99", "kl_max", "same_top_pct", "ppl_ratio", "rms_dp_pct", "max_abs_dp_pct",
                  "hidden_cosine_min")


@click.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("quants", metavar="QUANT...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tokens", "tokens_dir", type=click.Path(path_type=Path), required=True,
              help="Token folder; its val split is scored.")
@click.option("--n-tokens", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Val tokens to evaluate (rounded down to whole windows).")
@click.option("--ctx", type=click.IntRange(min=4), default=512, show_default=True,
              help="Window length; the second half of each window is scored.")
@click.option("--contract", type=click.Path(path_type=Path), default=None,
              help="Model contract TOML (default: shipkit's packaged contract).")
@click.option("--engine", type=click.Choice(list(ENGINE_CHOICES)), default="both", show_default=True,
              help="Runtime(s) to compare in; engine agreement needs both.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Device of the torch engine.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads for llama.cpp (its threads spin-wait: raise only on idle cores).")
@click.option("--tokenizer-tokens", type=click.IntRange(min=1), default=DEFAULT_TOKEN_BUDGET,
              show_default=True, help="Val text tokens the tokenizer check compares (whole documents).")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="Write RUN_DIR/evidence/parity.json.")
@json_option
def parity(base: Path, quants: tuple[Path, ...], tokens_dir: Path, n_tokens: int, ctx: int, contract: Path | None,
           engine: str, device: str, threads: int, tokenizer_tokens: int, run_dir: Path | None,
           as_json: bool) -> None:
    """Gate QUANT.gguf against BASE (.apr or F32/F16 .gguf) on held-out tokens and text; exit 1 on FAIL.

    Several QUANT files (a quant ladder) are scored in one run that shares the base model's
    forward; each is judged under its file type's band, and the first is the primary file that
    the engine agreement and the tokenizer check read.
    """
    from shipkit.parity import run_parity

    if run_dir is not None:
        check_folder_target(run_dir, "--run-dir")
    options = ParityOptions(base=base, quant=quants[0], extra_quants=quants[1:], tokens_dir=tokens_dir, n_tokens=n_tokens, ctx=ctx,
                            engines=ENGINE_CHOICES[engine], device=device, threads=threads,
                            contract=contract, run_dir=run_dir, tokenizer_tokens=tokenizer_tokens)
    with flag_spelling(ctx="--ctx", device="--device"):
        evidence = run_parity(options)
    emit(evidence, as_json, render_parity)
    if evidence["verdict"] != PASS:
        raise GateFailed(f"parity gate FAILED: {', '.join(evidence['failed'])}")


def render_parity(evidence: dict[str, Any]) -> str:
    tokens = evidence["tokens"]
    files = evidence.get("files")
    more = f" (+{len(files) - 1} more)" if files else ""
    lines = [f"parity: {Path(evidence['quant']['path']).name}{more} vs {Path(evidence['base']['path']).name}, "
             f"{tokens['tokens_evaluated']} val tokens in {tokens['windows']} windows of {tokens['ctx']}, "
             f"{tokens['positions_scored']} positions scored; contract {evidence['contract']['name']} "
             f"({evidence['contract']['band']})"]
    for name, engine in evidence["engines"].items():
        speed = engine["tokens_per_second"]
        lines.append(f"{name} on {engine['device']}: {speed:,.0f} tokens/s, {engine['seconds']:.2f} s, "
                     f"{engine['verdict']}" if speed else f"{name}: {engine['verdict']}")
        for metric in METRIC_COLUMNS:
            value = engine["metrics"][metric]
            verdict = engine["checks"].get(metric)
            limit = f" ({verdict['direction']} {verdict['limit']:g}) {verdict['verdict']}" if verdict else ""
            shown = "n/a" if value is None else f"{value:.6g}"
            lines.append(f"  {metric:18} {shown:>12}{limit}")
    agreement = evidence["agreement"]
    if agreement["metrics"]:
        metrics = agreement["metrics"]
        lines.append(f"engine agreement (F32): top-1 {metrics['top1_pct']:.3f}%, KL mean {metrics['kl_mean']:.3g}, "
                     f"{agreement['verdict']}")
    else:
        lines.append(f"engine agreement: {agreement['verdict']} ({agreement['note']})")
    worst = evidence["tensors"]["worst"][0]
    error = "n/a" if worst["rel_rmse"] is None else f"{worst['rel_rmse']:.4f}"
    lines.append(f"tensors: worst {worst['name']} rel RMSE {error}, {evidence['tensors']['verdict']}")
    tokenizer = evidence["tokenizer"]
    if tokenizer["verdict"] == SKIPPED:
        lines.append(f"tokenizer: {SKIPPED} ({tokenizer['note']})")
    else:
        documents = tokenizer["documents"]
        lines.append(f"tokenizer ({tokenizer['pre']}): {documents['documents_differing']} of "
                     f"{documents['documents_compared']} val documents differ, BOS/EOS "
                     f"{tokenizer['special_tokens']['verdict']}, chat template "
                     f"{tokenizer['chat_template']['verdict']}, {tokenizer['verdict']}")
    if files:
        lines += _ladder_lines(files)
    lines += [f"cause: {cause}" for cause in evidence["causes"]]
    lines.append(f"verdict: {evidence['verdict']}")
    return "\n".join(lines)


def _ladder_lines(files: list[dict[str, Any]]) -> list[str]:
    """One row per file: its size, the torch engine's numbers and its verdict under its band."""
    header = (f"{'file':{LADDER_NAME_WIDTH}} {'type':7} {'bpw':>5} {'KL mean':>9} {'KL p99':>9} {'same-top':>8} "
              f"{'PPL ratio':>9} {'imatrix':7} verdict  band")
    lines = ["files (torch engine, each under its file type's band):", f"  {header}"]
    for entry in files:
        metrics = entry["metrics"] or {}

        def shown(metric: str, fmt: str) -> str:
            value = metrics.get(metric)
            return "n/a" if value is None else format(value, fmt)

        lines.append(f"  {entry['name']:{LADDER_NAME_WIDTH}} {entry['file_type']:7} {entry['bits_per_weight']:5.2f} "
                     f"{shown('kl_mean', '.3g'):>9} {shown('kl_p99', '.3g'):>9} {shown('same_top_pct', '.2f'):>8} "
                     f"{shown('ppl_ratio', '.5f'):>9} {'yes' if entry['imatrix'] else 'no':7} "
                     f"{entry['verdict']:8} {entry['band']['name']}")
    return lines


commands = [parity]
