"""Helpers shared by the command modules."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def emit(result: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    """Print `result` as JSON (for machines) or through `render` (for people)."""
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        click.echo(render(result))
