"""Issue 18: how long the CLI takes to start. Best of `--repeats` wall times of `shipkit --help`
and `shipkit gates --help` in fresh interpreters, beside the interpreter's own floor
(`python -c pass`) measured in the same run; target ≤ 0.3 s.

    python benchmarks/bench_startup.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 0.3
COMMANDS = {"python -c pass": ["-c", "pass"], "shipkit --help": ["-m", "shipkit", "--help"],
            "shipkit gates --help": ["-m", "shipkit", "gates", "--help"]}


def best_wall(arguments: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, *arguments], cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    floor = best_wall(COMMANDS["python -c pass"], args.repeats)
    print(f"{'python -c pass':22} {floor:.3f} s")
    for name in ("shipkit --help", "shipkit gates --help"):
        seconds = best_wall(COMMANDS[name], args.repeats)
        verdict = "met" if seconds <= TARGET_SECONDS else "NOT met"
        print(f"{name:22} {seconds:.3f} s  ({seconds / floor:.1f}x the interpreter's start; "
              f"target <= {TARGET_SECONDS} s: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
