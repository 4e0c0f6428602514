"""The harness of the hostile-input suites (tests/test_hostile_*.py).

Each hostile input is run through the real CLI (in process, through click's runner; a
subprocess where a kill or a separate process is the point) and must be refused cleanly: exit 1
or 2, one line on stderr naming the problem, no traceback, no "internal error". Every refusal
checked here is counted; the session prints the tally (docs/reliability.md records it).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

# suite name -> hostile inputs refused cleanly, filled as the tests run
TALLY: Counter[str] = Counter()


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, cwd: Path | None = None) -> Outcome:
    """`shipkit ARGS` in this process (click's runner; stdout and stderr kept apart)."""
    from shipkit.cli import main

    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        result = CliRunner().invoke(main, [str(arg) for arg in args])
    return Outcome(result.exit_code, result.stdout, result.stderr)


def run_cli_process(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> Outcome:
    """`python -m shipkit ARGS` in a subprocess."""
    result = subprocess.run([sys.executable, "-m", "shipkit", *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    return Outcome(result.returncode, result.stdout, result.stderr)


def assert_refused(outcome: Outcome, suite: str, *, names: str | None = None, exit_codes: tuple[int, ...] = (1, 2)
                   ) -> str:
    """The input was refused cleanly; returns the error line. `names`: text the line must hold
    (the file, tensor or field at fault)."""
    line = outcome.stderr.strip()
    assert outcome.exit_code in exit_codes, f"exit {outcome.exit_code}: {line or outcome.stdout[-500:]}"
    assert "Traceback" not in outcome.stderr, outcome.stderr[-2000:]
    assert "internal error" not in line, line
    assert line.startswith("error: ") and "\n" not in line, line
    if names is not None:
        assert names in line, line
    TALLY[suite] += 1
    return line

