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

import jsonschema

from shipkit.errors import IntegrityError, InputError
from shipkit.fsutil import write_json

EVIDENCE_DIR = "evidence"


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The schema `shipkit/schemas/<name>.schema.json`."""
    text = resources.files("shipkit.schemas").joinpath(f"{name}.schema.json").read_text()
    return json.loads(text)


def check_against_schema(data: Any, schema_name: str, where: str) -> None:
    validator = jsonschema.Draft202012Validator(load_schema(schema_name))
    error = next(iter(sorted(validator.iter_errors(data), key=lambda e: list(e.path))), None)
    if error is not None:
        field = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise IntegrityError(f"{where}: field {field}: {error.message}")


def evidence_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / EVIDENCE_DIR / f"{name}.json"


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
