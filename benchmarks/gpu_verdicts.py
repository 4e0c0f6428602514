"""Issue 20 on one GPU: model-2 on the stdlib corpus as `shipkit ship` would train it, once to
the end and once with early stopping; each run's verdict, best epoch, turn epoch and stop epoch.

The corpus and tokens are those of `shipkit ship`'s default (the running Python's stdlib, 2% val
by content hash, an 8,192-token BPE), unless `--tokens` names a prepared TOKENS_DIR. Both runs
use the model-2 preset for `--num-steps` (2,400) in epochs of `--steps-per-epoch` (300): the run
of the issue (8 epochs, about 7.9 passes over a 2.5M-token train split). The second adds
`early_stop_patience` (`--patience`, 2).

    # the GPU host (16 cores, an H200; shipkit's dependencies on PYTHONPATH), 5 min 34 s measured:
    PYTHONPATH=.:$DEPS python benchmarks/gpu_verdicts.py --out /tmp/gpu-verdicts --check
    # tokens made elsewhere (`shipkit corpus build` + `shipkit tokenize train/encode`):
    PYTHONPATH=.:$DEPS python benchmarks/gpu_verdicts.py --tokens work/tokens --out /tmp/gpu-verdicts
    # the same logic on a CPU, small:
    PYTHONPATH=. python benchmarks/gpu_verdicts.py --device cpu --preset tiny --num-steps 40 \\
        --steps-per-epoch 10 --out /tmp/gv

OUT gets `full.json` and `early-stop.json` (each run's evidence/training-summary.json) and
`verdicts.json` (the machine, each phase's seconds, each run's verdict, best, turn and stop
epochs). The run folders go under `--work` (default OUT/work); their checkpoints (about 6 GB an
epoch for model-2: weights and the resume file) are deleted once a run ends unless
`--keep-checkpoints`. `--check` exits 1 unless the results are the issue's: the full run
`overfitting` turned at epoch 6 with best epoch 5, the early-stopped run stopped after epoch 7.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shipkit.corpus import CorpusConfig, build_corpus, default_source  # noqa: E402
from shipkit.evidence import read_evidence  # noqa: E402
from shipkit.ship import DEFAULT_MODEL_NAME, ModelSpec  # noqa: E402
from shipkit.tokenize import TokenizerConfig, encode_corpus, train_tokenizer  # noqa: E402
from shipkit.train import train  # noqa: E402
from shipkit.train.presets import apply_overrides, get_preset, parse_set_options  # noqa: E402

# The issue's done-when for the H200 run of model-2 on the stdlib (2,400 steps, 8 epochs).
ISSUE_RESULT = {"full": {"verdict": "overfitting", "best_epoch": 5, "turn_epoch": 6},
                "early-stop": {"stopped_after_epoch": 7}}


def build_tokens(work: Path) -> Path:
    """The default ship's corpus and tokens stages: the stdlib, its val split and its BPE."""
    spec = ModelSpec(name=DEFAULT_MODEL_NAME)
    build_corpus([default_source()], work / "corpus", CorpusConfig(val_fraction=spec.val_fraction, glob=spec.glob))
    train_tokenizer(work / "corpus", work / "tokens", TokenizerConfig(vocab_size=spec.vocab_size))
    encode_corpus(work / "corpus", work / "tokens")
    return work / "tokens"


def run(name: str, overrides: dict[str, Any], tokens: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One training run into WORK/NAME; returns its evidence (the run may stop early)."""
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    config = apply_overrides(get_preset(args.preset), overrides)
    train(config, tokens, run_dir, device=args.device, progress=False)
    evidence = read_evidence(run_dir, "training-summary")
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "ckpt")
    return evidence


def outcome(evidence: dict[str, Any]) -> dict[str, Any]:
    summary, verdict = evidence["summary"], evidence["summary"]["memorization"]
    early_stop = summary["early_stop"] or {}
    return {
        "verdict": verdict["verdict"],
        "rule": verdict["rule"],
        "best_epoch": summary["best_epoch"],
        "turn_epoch": verdict["turn_epoch"],
        "stop_reason": summary["stop_reason"],
        "stopped_after_epoch": early_stop.get("stopped_after_epoch"),
        "epochs_completed": summary["epochs_completed"],
        "best_val_loss": summary["best_val_loss"],
        "final_wraps": evidence["epochs"][-1]["wraps"],
        "tokens_per_second": [epoch["tokens_per_second"] for epoch in evidence["epochs"]],
        "mfu": [epoch["mfu"] for epoch in evidence["epochs"]],
        "reason": verdict["reason"],
    }


def mismatches(results: dict[str, dict[str, Any]]) -> list[str]:
    return [f"{name}: {key} {results[name][key]!r}, the issue expects {value!r}"
            for name, expected in ISSUE_RESULT.items() for key, value in expected.items()
            if results[name][key] != value]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Where the evidence JSONs are written.")
    parser.add_argument("--work", type=Path, default=None, help="Run folders, corpus, tokens (default OUT/work).")
    parser.add_argument("--tokens", type=Path, default=None, help="A prepared TOKENS_DIR (skips corpus and tokenize).")
    parser.add_argument("--preset", default="model-2")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--num-steps", type=int, default=2400)
    parser.add_argument("--steps-per-epoch", type=int, default=300)
    parser.add_argument("--patience", type=int, default=2, help="early_stop_patience of the second run.")
    parser.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
                        help="Any other config field, as `shipkit train --set` (repeatable).")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--check", action="store_true", help="Exit 1 unless the issue's results are met.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    tokens = args.tokens or build_tokens(work)
    seconds["tokens"] = round(time.perf_counter() - started, 1)
    overrides = {**parse_set_options(args.set_items), "num_steps": args.num_steps,
                 "steps_per_epoch": args.steps_per_epoch}
    results = {}
    for name, patience in (("full", 0), ("early-stop", args.patience)):
        started = time.perf_counter()
        evidence = run(name, {**overrides, "early_stop_patience": patience}, tokens, work, args)
        seconds[name] = round(time.perf_counter() - started, 1)
        (args.out / f"{name}.json").write_text(json.dumps(evidence, indent=2))
        results[name] = outcome(evidence)
        found = results[name]
        print(f"{name}: {found['verdict']} ({found['rule']}), best epoch {found['best_epoch']}, turn epoch "
              f"{found['turn_epoch']}, {found['stop_reason']} after epoch {found['epochs_completed']} "
              f"({found['final_wraps']:.2f} passes), {seconds[name]} s", flush=True)
        print(f"  {found['reason']}", flush=True)

    report = {
        "machine": {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "tokens_dir": str(tokens), "preset": args.preset, "overrides": overrides,
        "patience": args.patience, "seconds": seconds, "runs": results,
    }
    (args.out / "verdicts.json").write_text(json.dumps(report, indent=2))
    print(f"seconds: {seconds}")
    problems = mismatches(results)
    for problem in problems:
        print(f"differs from the issue: {problem}")
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
