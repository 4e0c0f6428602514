"""Click commands, one module per pipeline stage, each a thin layer over the stage's Python API.

A module here defines `commands`: a list of click commands added to the `shipkit` group.

The result convention. A command parses its options, calls one stage function and hands what it
returns to `common.emit` with a `render` function that turns it into text for people; `--json`
prints its JSON instead. The command adds nothing to the result: besides that text it only maps
a failed check to its exit code, raised after the result is printed so that a failing run still
shows it. A stage function returns one of two things:
- a result dataclass whose `to_dict()` is that JSON (paths as strings, keys named for the reader)
  and which `render` reads by attribute, e.g. `ValidationReport`, `AprIndex`, `ExportReport`,
  `ImportReport`, `TokenizerResult`, `Comparison`;
- the JSON document it wrote to disk, as the dict written, when that document is the stage's
  whole result: corpus.json (`build_corpus`, docs/corpus.md), the token manifest.json
  (`encode_corpus`, docs/tokens-format.md), audit.json (`audit_tokens`), the evidence files
  (`train` and `resume`: training-summary.json; `run_parity`, `run_gates`; docs/evidence.md).
  The file's documented schema is the contract and `--json` prints that same document; a
  dataclass would only repeat the schema.
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
