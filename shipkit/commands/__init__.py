"""Click commands, one module per pipeline stage, each a thin layer over the stage's Python API.

A module here defines `commands`: a list of click commands added to the `shipkit` group.
"""

from __future__ import annotations

import importlib
import pkgutil

import click


def register_all(group: click.Group) -> None:
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for command in getattr(module, "commands", []):
            group.add_command(command)
