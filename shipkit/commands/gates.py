"""`shipkit gates`: the release scoreboard."""

from __future__ import annotations

from pathlib import Path

import click

from shipkit.commands.common import emit, json_option
from shipkit.errors import GateFailed
from shipkit.layout import RunDir


@click.command("gates")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--contract", type=click.Path(path_type=Path), default=None,
              help="The model's contract TOML (default: shipkit/contracts/default.toml; docs/contracts.md).")
# shipkit.gates' default, taken from the run folder's layout: shipkit.gates itself loads torch.
@click.option("--checkpoint", default=RunDir.BEST, show_default=True,
              help="The released checkpoint, relative to RUN_DIR.")
@json_option
def gates(run_dir: Path, contract: Path | None, checkpoint: str, as_json: bool) -> None:
    """Check every release gate (TRAIN, CHECKPOINT, PARITY, CARD, RELEASE, FALSIFIERS) against
    RUN_DIR's files and evidence; print the scoreboard and write RUN_DIR/evidence/gates.json.
    Exits 1 when any gate FAILED."""
    from shipkit.evidence import FAIL, FAILED
    from shipkit.gates import render_scoreboard, run_gates

    result = run_gates(run_dir, contract=contract, checkpoint=checkpoint)
    emit(result, as_json, render_scoreboard)
    if result["verdict"] == FAIL:
        failed = [gate["id"] for gate in result["gates"] if gate["status"] == FAILED]
        raise GateFailed(f"gates FAILED: {', '.join(failed)} ({result['summary']})")


commands = [gates]
