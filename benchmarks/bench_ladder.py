"""Issue 19: what a code importance matrix buys each quant type, measured on held-out code.

Trains a model on the default ship's corpus (the running Python's stdlib: its train split; the
val split is held out by content hash), computes the importance matrix on the train split
(`shipkit.imatrix.compute_imatrix`), writes every ladder type twice — without and with that
imatrix — and scores all files in ONE parity run (torch engine, one base forward shared by
every file) on the val split. Prints per type: bits per weight, KL mean without / with the
imatrix and the change, and checks the issue's target: the imatrix lowers Q4_K_M's KL mean by
≥ 10% and Q4_K_S's by ≥ 20% (llama.cpp's published Llama-3-8B gains, tools/perplexity/README.md).
Types whose quantizer ignores an importance matrix in llama.cpp (Q8_0, F16, BF16) are written
once.

    # the tiny CPU run (the default ship's model, 300 steps), ~6 min on 2 cores:
    python benchmarks/bench_ladder.py --out /tmp/ladder-cpu
    # model-2 on one GPU (shipkit's dependencies on PYTHONPATH):
    PYTHONPATH=.:$DEPS python benchmarks/bench_ladder.py --preset model-2 --device cuda \\
        --num-steps 600 --out /tmp/ladder-gpu --check

`--tokens DIR --checkpoint APR` scores an existing model instead of training one.
OUT gets `ladder.json` (machine, phase seconds, the table) and `parity.json` (the parity run's
evidence, every file's section). `--check` exits 1 unless both targets are met.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_verdicts import build_tokens  # noqa: E402

from shipkit.imatrix import compute_imatrix  # noqa: E402
from shipkit.parity import ParityOptions, run_parity  # noqa: E402
from shipkit.quantize import write_gguf  # noqa: E402
from shipkit.quantize.mix import FILE_TYPES  # noqa: E402
from shipkit.train import train  # noqa: E402
from shipkit.train.presets import apply_overrides, get_preset  # noqa: E402

# llama.cpp's quantizers for these ignore the importance matrix (ggml's quantize_q8_0 and the
# float conversions take no weights), so one file stands for both columns.
IMATRIX_BLIND = ("Q8_0", "F16", "BF16")
LADDER = tuple(name for name in FILE_TYPES if name != "F32")
# The targets: relative KL-mean reduction from the code imatrix (Llama-3-8B, PR #6936).
TARGETS = {"Q4_K_M": 0.10, "Q4_K_S": 0.20}
# Scoring only: the bench reports numbers, it gates nothing, so no file may fail on thresholds.
SCORING_CONTRACT = ('[parity]\nrequired_engines = ["torch"]\n'
                    '[parity.thresholds.kl_mean]\nmax = 1e9\nreason = "bench: scoring only"\n')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=Path, help="a prepared tokens folder (default: build the stdlib's)")
    parser.add_argument("--checkpoint", type=Path, help="a trained weights .apr on --tokens (skips training)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--num-steps", type=int, help="training steps (default: the preset's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--imatrix-tokens", type=int, default=65536)
    parser.add_argument("--parity-tokens", type=int, default=65536)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--types", default=",".join(LADDER), help="comma-separated ladder types")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the targets are met")
    return parser.parse_args()


def train_model(args: argparse.Namespace, tokens: Path, run_dir: Path) -> Path:
    overrides: dict[str, Any] = {"num_steps": args.num_steps} if args.num_steps else {}
    config = apply_overrides(get_preset(args.preset), overrides)
    train(config, tokens, run_dir, device=args.device, compile_model=args.device != "cpu", progress=False)
    return run_dir / "ckpt" / "best.apr"


def write_files(checkpoint: Path, folder: Path, types: list[str], imatrix: Path) -> dict[tuple[str, bool], Path]:
    """(type, with imatrix) -> GGUF path, each written by shipkit's quantizer on the CPU."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in types:
        for use_imatrix in (False, True):
            if use_imatrix and name in IMATRIX_BLIND:
                continue
            path = folder / f"{name}{'-imatrix' if use_imatrix else ''}.gguf"
            write_gguf(checkpoint, path, name, imatrix=imatrix if use_imatrix else None)
            files[(name, use_imatrix)] = path
    return files


def table(files: dict[tuple[str, bool], Path], evidence: dict[str, Any], types: list[str]) -> list[dict[str, Any]]:
    by_name = {entry["name"]: entry for entry in evidence["files"]}
    rows = []
    for name in types:
        plain = by_name[files[(name, False)].name]
        weighted = by_name[files[(name, True)].name] if (name, True) in files else None
        kl_plain = plain["metrics"]["kl_mean"]
        kl_imatrix = weighted["metrics"]["kl_mean"] if weighted else None
        change = (kl_plain - kl_imatrix) / kl_plain if kl_imatrix is not None and kl_plain else None
        rows.append({"type": name, "bits_per_weight": plain["bits_per_weight"], "bytes": plain["bytes"],
                     "kl_mean": kl_plain, "kl_mean_imatrix": kl_imatrix, "kl_reduction": change,
                     "same_top_pct": plain["metrics"]["same_top_pct"],
                     "same_top_pct_imatrix": weighted["metrics"]["same_top_pct"] if weighted else None})
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'type':8} {'bpw':>6} {'KL mean':>10} {'KL imatrix':>11} {'change':>8}"]
    for row in rows:
        weighted = "-" if row["kl_mean_imatrix"] is None else f"{row['kl_mean_imatrix']:.6f}"
        change = "-" if row["kl_reduction"] is None else f"{-100 * row['kl_reduction']:+.1f}%"
        lines.append(f"{row['type']:8} {row['bits_per_weight']:6.2f} {row['kl_mean']:10.6f} {weighted:>11} {change:>8}")
    return "\n".join(lines)


def target_results(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {row["type"]: row["kl_reduction"] for row in rows}
    return {name: {"target": goal, "measured": found.get(name),
                   "met": found.get(name) is not None and found[name] >= goal}
            for name, goal in TARGETS.items()}


def main() -> int:
    args = parse_args()
    types = [name.strip().upper() for name in args.types.split(",") if name.strip()]
    unknown = sorted(set(types) - set(LADDER))
    if unknown:
        print(f"error: --types: unknown type(s) {', '.join(unknown)} (one of {', '.join(LADDER)})", file=sys.stderr)
        return 2
    work = args.out / "work"
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    tokens = args.tokens or build_tokens(work)
    seconds["tokens"] = time.perf_counter() - started

    started = time.perf_counter()
    checkpoint = args.checkpoint or train_model(args, tokens, work / "run")
    seconds["train"] = time.perf_counter() - started

    started = time.perf_counter()
    imatrix = compute_imatrix(checkpoint, tokens, work / "imatrix.gguf", n_tokens=args.imatrix_tokens,
                              ctx=args.ctx, device=args.device)
    seconds["imatrix"] = time.perf_counter() - started

    started = time.perf_counter()
    files = write_files(checkpoint, work / "gguf", types, imatrix.path)
    seconds["quantize"] = time.perf_counter() - started

    contract = work / "scoring.toml"
    contract.write_text(SCORING_CONTRACT)
    paths = list(files.values())
    started = time.perf_counter()
    evidence = run_parity(ParityOptions(base=checkpoint, quant=paths[0], extra_quants=tuple(paths[1:]),
                                        tokens_dir=tokens, n_tokens=args.parity_tokens, ctx=args.ctx,
                                        engines=("torch",), device=args.device, contract=contract))
    seconds["parity"] = time.perf_counter() - started

    rows = table(files, evidence, types)
    targets = target_results(rows)
    result = {"machine": {"platform": platform.platform(), "cpu_count": torch.get_num_threads(),
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "num_steps": args.num_steps,
              "device": args.device, "calibration": imatrix.calibration.to_dict(),
              "parity_tokens": args.parity_tokens, "ctx": args.ctx,
              "seconds": {name: round(value, 1) for name, value in seconds.items()},
              "rows": rows, "targets": targets}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ladder.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "parity.json").write_text(json.dumps(evidence, indent=2, default=str) + "\n")
    print(render(rows))
    for name, outcome in targets.items():
        measured = "n/a" if outcome["measured"] is None else f"{100 * outcome['measured']:.1f}%"
        print(f"{name}: imatrix lowers KL mean by {measured} (target >= {100 * outcome['target']:.0f}%): "
              f"{'met' if outcome['met'] else 'NOT met'}")
    print("seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items()))
    return 0 if not args.check or all(outcome["met"] for outcome in targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
