"""Evidence files: the JSON every later stage (card, gates, push) reads its numbers from.

Each lives under `RUN_DIR/evidence/` and is validated against a JSON Schema shipped in
`shipkit/schemas/` on write and on read, so a card can never quote a field that is not there.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import write_json
from shipkit.layout import RunDir

# The evidence files, by schema name (RUN_DIR/evidence/<name>.json, shipkit/schemas/<name>.schema.json).
TRAINING_EVIDENCE = "training-summary"
PARITY_EVIDENCE = "parity"
RELEASE_EVIDENCE = "release"
GATES_EVIDENCE = "gates"

# The verdict of a check, of a group of checks and of parity.json and gates.json as a whole.
PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
# A release gate's status (docs/gates.md): the evidence proves the claim; is incomplete but
# contradicts nothing; contradicts it or is missing.
DISCHARGED, PARTIAL, FAILED = "DISCHARGED", "PARTIAL", "FAILED"
GATE_STATUSES = (DISCHARGED, PARTIAL, FAILED)


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The schema `shipkit/schemas/<name>.schema.json`."""
    text = resources.files("shipkit.schemas").joinpath(f"{name}.schema.json").read_text()
    return json.loads(text)


def check_against_schema(data: Any, schema_name: str, where: str) -> None:
    # Imported here: the names above are read by modules the CLI loads at start-up.
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema(schema_name))
    error = next(iter(sorted(validator.iter_errors(data), key=lambda e: list(e.path))), None)
    if error is not None:
        field = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise IntegrityError(f"{where}: field {field}: {error.message}")


def evidence_path(run_dir: str | Path, name: str) -> Path:
    return RunDir(Path(run_dir)).evidence(name)


def write_evidence(run_dir: str | Path, name: str, data: dict[str, Any]) -> Path:
    """Validate `data` against schema `name` and write it atomically to evidence/<name>.json."""
    path = evidence_path(run_dir, name)
    check_against_schema(data, name, str(path))
    write_json(path, data)
    return path


def read_evidence(run_dir: str | Path, name: str) -> dict[str, Any]:
    path = evidence_path(run_dir, name)
    if not path.is_file():
        raise InputError(f"{path}: evidence file not found (run the stage that writes it first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise IntegrityError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    check_against_schema(data, name, str(path))
    return data
