"""Ship's memory between runs, `OUT/ship-state.json`: per stage, the fingerprint of what it was
asked to do and the sha256 of every file it wrote. A stage whose fingerprint is unchanged and
whose outputs still hash the same is done; shipkit.ship.runner skips it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from shipkit.errors import IntegrityError, ShipkitError
from shipkit.fsutil import sha256_file, write_json
from shipkit.ship.config import STATE_FILE
from shipkit.ship.preflight import is_inside


class StageLedger:
    """`OUT/ship-state.json`: per stage, its fingerprint and the sha256 of its outputs."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / STATE_FILE
        self.stages: dict[str, Any] = {}
        if self.path.is_file():
            try:
                stages = json.loads(self.path.read_bytes())
            except ValueError:
                raise IntegrityError(f"{self.path}: not valid JSON (delete it to run every stage again)") from None
            if not _is_ledger(stages):
                raise IntegrityError(f"{self.path}: not a ship ledger (each stage needs a fingerprint and "
                                     "the sha256 of its outputs); delete it to run every stage again")
            self.stages = stages

    def is_done(self, key: str, fingerprint: str) -> bool:
        entry = self.stages.get(key)
        if entry is None or entry["fingerprint"] != fingerprint:
            return False
        return all(self._is_own_file(Path(path)) and sha256_file(path) == digest
                   for path, digest in entry["outputs"].items())

    def _is_own_file(self, path: Path) -> bool:
        """A regular file inside OUT: a ledger naming anything else (edited by hand) is not trusted."""
        return path.is_file() and is_inside(self.out, path)

    def record(self, key: str, fingerprint: str, outputs: list[Path]) -> None:
        files = sorted(p for output in outputs for p in _files_under(output))
        self.stages[key] = {"fingerprint": fingerprint, "outputs": {str(p): sha256_file(p) for p in files}}
        write_json(self.path, self.stages)

    def outputs_digest(self, key: str) -> str:
        return sha256_json(self.stages[key]["outputs"])


def _is_ledger(stages: Any) -> bool:
    return isinstance(stages, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("fingerprint"), str)
        and isinstance(entry.get("outputs"), dict)
        and all(isinstance(digest, str) for digest in entry["outputs"].values())
        for entry in stages.values())


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not path.is_file():
        raise ShipkitError(f"{path}: the stage finished but did not write it")
    return [path]


def sha256_json(value: Any) -> str:
    """A JSON value's sha256 (keys sorted): a fingerprint, or a stage's outputs in one hash."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
