"""The scoreboard: every category's gates evaluated in order (`evaluate_gates`), written as
RUN_DIR/evidence/gates.json (`run_gates`), a recorded scoreboard compared with one evaluated now
(what `shipkit push` refuses on), and the table `shipkit gates` prints."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shipkit import __version__
from shipkit.contract import load_contract
from shipkit.errors import InputError, IntegrityError
from shipkit.evidence import (
    DISCHARGED,
    FAIL,
    FAILED,
    GATE_STATUSES,
    GATES_EVIDENCE,
    PARTIAL,
    PASS,
    write_evidence,
)
from shipkit.gates.card import card_gates
from shipkit.gates.checkpoint import checkpoint_gates
from shipkit.gates.falsifiers import falsifier_gates
from shipkit.gates.parity import parity_gates
from shipkit.gates.release import release_gates
from shipkit.gates.train import train_gates
from shipkit.gates.view import Gate, RunView, load_run
from shipkit.layout import RunDir

SCHEMA_VERSION = 1
# Each category's gates (TRAIN, CHECKPOINT, PARITY, CARD, RELEASE, FALSIFIERS): the scoreboard's order.
GATE_GROUPS: tuple[Callable[[RunView], list[Gate]], ...] = (
    train_gates, checkpoint_gates, parity_gates, card_gates, release_gates, falsifier_gates,
)


def evaluate_gates(run_dir: str | Path, *, contract: str | Path | None = None,
                   checkpoint: str = RunDir.BEST) -> dict[str, Any]:
    """Every gate of `run_dir` under `contract` (the default contract when None); returns the
    gates evidence (schema `gates`) without writing it. Raises InputError for a missing RUN_DIR
    or a bad contract; a failed gate is a FAILED entry, never an exception."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder (give the RUN_DIR of `shipkit train` or `shipkit import`)")
    # An absolute path in `contract.source` lets `shipkit push` re-evaluate from any folder.
    loaded = load_contract(None if contract is None else Path(contract).resolve())
    view = load_run(run_dir, loaded, checkpoint)
    gates = [gate for group in GATE_GROUPS for gate in group(view)]
    counts = {status: sum(gate.status == status for gate in gates) for status in GATE_STATUSES}
    return {
        "schema_version": SCHEMA_VERSION,
        "verdict": FAIL if counts[FAILED] else PASS,
        "summary": summary_line(counts),
        "counts": counts,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shipkit_version": __version__,
        "host": platform.node(),
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "imported": view.source is not None,
        "contract": {"name": loaded.name, "source": loaded.source},
        "gates": [gate.to_dict() for gate in gates],
    }


def run_gates(run_dir: str | Path, *, contract: str | Path | None = None,
              checkpoint: str = RunDir.BEST) -> dict[str, Any]:
    """`evaluate_gates`, written to `RUN_DIR/evidence/gates.json`; returns the evidence."""
    result = evaluate_gates(run_dir, contract=contract, checkpoint=checkpoint)
    write_evidence(run_dir, GATES_EVIDENCE, result)
    return result


# ---------------------------------------------------------------------------------------------
# A recorded scoreboard against one evaluated now (`shipkit push`)

# Fields of the record that follow from its gates: named as changed only when the gates agree.
DERIVED_FIELDS = ("verdict", "summary", "counts")
# Fields that must agree too. Left out: `date`, `host`, `shipkit_version`, `run_dir` (how RUN_DIR
# was spelled) and each gate's `detail`, prose made from its evidence that may quote RUN_DIR.
RECORD_FIELDS = ("checkpoint", "imported")
GATE_FIELDS = ("category", "status", "evidence")


def recorded_contract(scoreboard: dict[str, Any]) -> Path | None:
    """The contract file a scoreboard was evaluated under, None for the packaged default: read
    back from `contract.source`, which `load_contract` writes as `PATH (over DEFAULT)`."""
    source, default = scoreboard["contract"]["source"], load_contract(None).source
    if source == default:
        return None
    path, over, rest = source.rpartition(" (over ")
    if not over or rest != f"{default})":
        raise IntegrityError(f"{RunDir.evidence_file(GATES_EVIDENCE)}: contract.source {source!r} names no contract "
                             "file; re-run `shipkit gates`")
    return Path(path)


def scoreboard_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How the scoreboard evaluated now differs from the recorded one, a phrase per changed gate
    or field; empty when they agree."""
    before = {gate["id"]: gate for gate in recorded["gates"]}
    now = {gate["id"]: gate for gate in current["gates"]}
    changes = [f"gate {gate_id} {change}" for gate_id in [*now, *(i for i in before if i not in now)]
               if (change := _gate_change(before.get(gate_id), now.get(gate_id)))]
    if not changes and [gate["id"] for gate in recorded["gates"]] != [gate["id"] for gate in current["gates"]]:
        changes.append("the recorded gates repeat or reorder gates")
    fields = [*RECORD_FIELDS, *(() if changes else DERIVED_FIELDS)]
    changes += [f"{name} {_canonical(recorded[name])} recorded, {_canonical(current[name])} now"
                for name in fields if _canonical(recorded[name]) != _canonical(current[name])]
    if recorded["contract"]["name"] != current["contract"]["name"]:
        changes.append(f"contract {recorded['contract']['name']!r} recorded, {current['contract']['name']!r} now")
    return changes


def _gate_change(before: dict[str, Any] | None, now: dict[str, Any] | None) -> str | None:
    if before is None:
        return f"{now['status']} now, absent from the record"
    if now is None:
        return f"{before['status']} in the record, no longer evaluated"
    if before["status"] != now["status"]:
        return f"{before['status']} recorded, {now['status']} now ({' '.join(now['detail'].split())})"
    if any(_canonical(before[name]) != _canonical(now[name]) for name in GATE_FIELDS):
        return f"{now['status']} in both, but its evidence or category changed"
    return None


def _canonical(value: Any) -> str:
    """JSON text, so a value compares equal to itself read back from evidence (tuples, NaN)."""
    return json.dumps(value, sort_keys=True)


def summary_line(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return f"{counts[DISCHARGED]}/{total} DISCHARGED, {counts[PARTIAL]} PARTIAL, {counts[FAILED]} FAILED"


def render_scoreboard(result: dict[str, Any]) -> str:
    """The gates as a table (category, gate, status, evidence) and the summary line."""
    rows = [("CATEGORY", "GATE", "STATUS", "EVIDENCE")]
    for gate in result["gates"]:
        rows.append((gate["category"], gate["id"], gate["status"], _evidence_text(gate["evidence"]) or "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}" for row in rows]
    failing = [gate for gate in result["gates"] if gate["status"] != DISCHARGED]
    if failing:
        lines.append("")
        lines += [f"{gate['status']} {gate['id']}: {gate['detail']}" for gate in failing]
    lines += ["", f"contract {result['contract']['name']} ({result['contract']['source']})", result["summary"]]
    return "\n".join(lines)


def _evidence_text(evidence: list[dict[str, Any]]) -> str:
    """`file: field=value, field=value; file: ...` with each file named once."""
    by_file: dict[str, list[str]] = {}
    for item in evidence:
        by_file.setdefault(item["file"], []).append(f"{item['field']}={_short(item['value'])}")
    return "; ".join(f"{file.removeprefix(f'{RunDir.EVIDENCE}/')}: {', '.join(fields)}"
                     for file, fields in by_file.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    if isinstance(value, list):
        text = "[" + ", ".join(_short(item) for item in value) + "]"
    else:
        text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 48 else text[:47] + "…"
