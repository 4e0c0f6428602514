"""Helpers shared by the command modules.

Building the click group must stay cheap (`shipkit --help` in well under a second), so a command
module imports its stage inside the command function, and an option whose default or choices
the stage defines names them by `StageValue`, read only when click parses that command or shows
its --help.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import click

from shipkit.errors import ShipkitError

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def emit(result: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    """Print a stage's result (the convention in `shipkit.commands`): as JSON for machines, its
    `to_dict()` or the document dict itself, or as `render(result)` for people."""
    if as_json:
        document = result if isinstance(result, dict) else result.to_dict()
        click.echo(json.dumps(document, indent=2, sort_keys=True, default=str))
    else:
        click.echo(render(result))


class StageValue:
    """`module`'s `attribute` (a dotted path such as "CorpusConfig.seed"), passed through
    `convert`, imported when called. As an option's default, click calls it when it parses
    the command line, and its str() is the default --help shows."""

    def __init__(self, module: str, attribute: str, convert: Callable[[Any], Any] | None = None) -> None:
        self.module, self.attribute, self.convert = module, attribute, convert

    def __call__(self) -> Any:
        value: Any = importlib.import_module(self.module)
        for name in self.attribute.split("."):
            value = getattr(value, name)
        return value if self.convert is None else self.convert(value)

    def __str__(self) -> str:
        return str(self())


class StageChoice(click.Choice):
    """A click.Choice over the names a stage module defines (a `StageValue`), read on first use."""

    def __init__(self, names: StageValue, case_sensitive: bool = True) -> None:
        # click.Choice.__init__ would read the names now; `choices` reads them when needed.
        self.names = names
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.names())


@contextlib.contextmanager
def flag_spelling(**flags: str) -> Iterator[None]:
    """Library errors begin with the field at fault (`vocab_size 100: ...`, `preset: ...`); on
    the command line that field was a flag, so an error beginning with one of `flags`' fields
    (keyword: the field, value: its flag, such as vocab_size="--vocab-size") is raised again
    beginning with the flag instead."""
    try:
        yield
    except ShipkitError as error:
        message = str(error)
        for field, flag in flags.items():
            if message.startswith((f"{field}:", f"{field} ")):
                raise type(error)(flag + message[len(field):]) from error
        raise
