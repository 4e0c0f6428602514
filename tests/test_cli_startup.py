"""The CLI starts without its stages: building the click group (and `--help`) imports no torch,
transformers or other heavy library; an option default or choice list read lazily from a stage
is the stage's own."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import click
from click.testing import CliRunner

from shipkit.cli import main
from shipkit.commands.common import StageChoice, StageValue

# What a stage imports and building the CLI must not: seconds of start-up between them.
HEAVY_MODULES = ("torch", "transformers", "tokenizers", "numpy", "pyarrow", "gguf", "safetensors",
                 "huggingface_hub", "matplotlib")
COMMANDS = ("audit", "card", "compare", "convert", "corpus", "export", "gates", "imatrix", "import",
            "inspect", "parity", "push", "quantize", "ship", "tokenize", "train", "validate")


def _fresh_cli(*args: str) -> dict:
    """Run `shipkit ARGS` in a new interpreter; its output and the heavy modules it imported."""
    code = f"""
import contextlib, io, json, sys
from shipkit.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    main.main({list(args)!r}, prog_name="shipkit", standalone_mode=False)
print(json.dumps({{"output": out.getvalue(),
                  "heavy": [name for name in {HEAVY_MODULES!r} if name in sys.modules]}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_building_the_cli_imports_no_stage_library() -> None:
    code = f"import sys, shipkit.cli; print([name for name in {HEAVY_MODULES!r} if name in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_help_lists_every_command_without_importing_a_stage() -> None:
    result = _fresh_cli("--help")
    listed = {line.split()[0] for line in result["output"].split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(COMMANDS)
    assert result["heavy"] == []


def test_gates_help_shows_the_gates_default_without_importing_a_stage() -> None:
    from shipkit.gates import run_gates

    default = inspect.signature(run_gates).parameters["checkpoint"].default
    result = _fresh_cli("gates", "--help")
    assert f"[default: {default}]" in " ".join(result["output"].split())
    assert result["heavy"] == []


def _options(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, click.Parameter]]:
    """(command path, parameter) of every parameter of `command` and its subcommands."""
    if isinstance(command, click.Group):
        return [found for name, sub in command.commands.items() for found in _options(sub, (*path, name))]
    return [(" ".join(path), param) for param in command.params]


def test_lazy_defaults_and_choices_resolve() -> None:
    """Each `StageValue` names a module and attribute that exist (a typo would otherwise fail
    only when that command runs)."""
    for where, param in _options(main):
        if isinstance(param.default, StageValue):
            assert param.default() is not None, f"{where} {param.name}"
        if isinstance(param.type, StageChoice):
            assert param.type.choices, f"{where} {param.name}"


def _help(*command: str) -> str:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _shows_default(help_text: str, default: object) -> bool:
    """click writes `[default: 64]`, or `[default: 64; x>=1]` for a ranged option."""
    return f"[default: {default}]" in help_text or f"[default: {default};" in help_text


def test_help_shows_the_stages_defaults_and_choices() -> None:
    from shipkit.audit import AuditConfig
    from shipkit.corpus import CorpusConfig
    from shipkit.quantize.mix import FILE_TYPES
    from shipkit.tokenize import EncodeConfig, TokenizerConfig
    from shipkit.train.presets import PRESETS

    corpus_help = _help("corpus", "build")
    for default in (CorpusConfig.val_fraction, CorpusConfig.seed, CorpusConfig.glob, CorpusConfig.shard_bytes >> 20):
        assert _shows_default(corpus_help, default)
    assert _shows_default(_help("audit"), AuditConfig.window)
    assert _shows_default(_help("tokenize", "train"), TokenizerConfig.vocab_size)
    assert _shows_default(_help("tokenize", "encode"), EncodeConfig.shard_tokens)
    assert f"[{'|'.join(FILE_TYPES)}]".lower() in _help("quantize")  # case-insensitive: shown lower-case
    assert f"[{'|'.join(sorted(PRESETS))}]" in _help("train")


def test_help_texts_name_the_stages_constants() -> None:
    """Help text that cannot be read lazily spells a stage's constant out; it must stay the same."""
    from shipkit.audit import AUDIT_NAME
    from shipkit.corpus import TEXT_COLUMNS

    assert f"[default: TOKENS_DIR/{AUDIT_NAME}]" in _help("audit")
    assert f"[default: first of {', '.join(TEXT_COLUMNS)}]" in _help("corpus", "build")


def test_a_lazy_choice_checks_the_value_as_click_choice_does(tmp_path) -> None:
    """Case-insensitive as before; an unknown value is refused by click, listing the choices."""
    args = ["quantize", str(tmp_path / "missing.apr"), "--out", str(tmp_path / "x.gguf"), "--type"]
    accepted = CliRunner().invoke(main, [*args, "q4_k_m"])
    assert accepted.exit_code == 2 and "missing.apr: no such file" in accepted.output
    refused = CliRunner().invoke(main, [*args, "bogus"])
    assert refused.exit_code == 2 and "'bogus' is not one of" in refused.output and "'q4_k_m'" in refused.output
