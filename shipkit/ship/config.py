"""ship.toml as typed, checked dataclasses: `ModelSpec` (one `[[model]]` table), `ShipConfig`
(the `[ship]` table and the models), `load_ship_config` and the embedded `default_config`.

Every value is checked against its field's declared type and its rules when the spec is made,
before any stage runs; errors name the file, the model and the field. Format: docs/ship.md.
The stages that run a spec: shipkit.ship.runner.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shipkit.errors import InputError
from shipkit.ladder import ImatrixSettings, LadderEntry, parse_imatrix, parse_ladder

# ship's own files in OUT, beside one folder per model (shipkit.ship.ledger, shipkit.ship.runner)
STATE_FILE = "ship-state.json"
SUMMARY_FILE = "ship-summary.json"
DEFAULT_OUT = Path("ship-out")
DEFAULT_MODEL_NAME = "shipkit-tiny"
# The default run's falsifiable prediction: the tiny preset on the stdlib has ended between 4.5 and
# 4.9 nats; above 5.5 means training regressed.
DEFAULT_PREDICTION = "best_val_loss < 5.5"
QUANT_TYPE = "Q4_K_M"
SOURCES = ("train", "import")
DEVICES = ("cpu", "cuda")
# A model's name is its folder under OUT and its GGUF base name: no separators, no way up.
PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")
MAX_NAME_CHARS = 96  # the Hub's limit for a repo name; the default repo is shipkit-local/<name>
MIN_PARITY_CTX = 4  # shipkit.parity.inputs.eval_windows: the first half of each window is context
# How the TOML types are named in errors: (one value, a list of them).
TOML_TYPE_NAMES: dict[Any, tuple[str, str]] = {
    bool: ("true or false", "true/false values"),
    int: ("an integer", "integers"),
    float: ("a finite number", "finite numbers"),
    str: ("a string", "strings"),
    Path: ("a string (a path)", "paths"),
    dict: ("a table", "tables"),
}
MAX_SHOWN_CHARS = 60  # a wrong value is quoted in the error up to this length


@dataclass
class ModelSpec:
    """One model of a release. `source` is "train" (from scratch) or "import" (an HF folder)."""

    name: str = DEFAULT_MODEL_NAME
    source: str = "train"
    # the corpus (train path: training data; both paths: the held-out tokens parity scores)
    corpus: list[str] = field(default_factory=list)  # empty: this Python's standard library
    text_column: str | None = None
    glob: str = "*.py"
    val_fraction: float = 0.02
    vocab_size: int = 8192
    # training
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    predict: list[str] = field(default_factory=list)
    device: str = "cpu"
    compile: bool = True
    # import
    hf_dir: str | None = None
    base_model: str | None = None
    license: str | None = None
    pre: str | None = None  # llama.cpp pre-tokenizer name, for a tokenizer import cannot recognise
    # quantize, parity, release
    # the GGUF ladder: file type names, or tables with llama-quantize's overrides (shipkit.ladder)
    quant_types: list[str | dict[str, Any]] = field(default_factory=lambda: [QUANT_TYPE])
    imatrix: bool | dict[str, Any] = False  # true, or { n_tokens = N, ctx = C }: quantize with an importance matrix
    parity_tokens: int = 8192
    parity_ctx: int = 256
    parity_engines: list[str] = field(default_factory=lambda: ["torch", "llama.cpp"])
    contract: str | None = None
    repo: str | None = None
    gguf_repo: str | None = None
    datasets: list[str] = field(default_factory=list)
    card_templates: str | None = None  # a folder of *.j2 files replacing shipkit's card templates by name

    def __post_init__(self) -> None:
        problem = _name_problem(self.name)
        if problem:
            raise InputError(f"model {self.name!r}: field name: {problem}")
        found = next(self._problems(), None)
        if found:
            raise InputError(f"model {self.name}: field {found[0]}: {found[1]}")

    def _problems(self) -> Iterator[tuple[str, str]]:
        """(field, what is wrong) for each rule the values break, in field order."""
        from shipkit.parity import LLAMA_CPP, TORCH
        from shipkit.predict import parse_prediction
        from shipkit.tokenize import MIN_VOCAB_SIZE
        from shipkit.train.presets import apply_overrides, get_preset

        if self.source not in SOURCES:
            yield "source", f"must be 'train' or 'import', got {self.source!r}"
        if self.source == "import" and not self.hf_dir:
            yield "hf_dir", "required when source = 'import'"
        if not 0 < self.val_fraction < 1:
            yield "val_fraction", f"must be between 0 and 1 (exclusive), got {self.val_fraction}"
        if self.vocab_size < MIN_VOCAB_SIZE:
            yield "vocab_size", f"must be at least {MIN_VOCAB_SIZE} (256 bytes + end of text), got {self.vocab_size}"
        train_config = None
        try:
            preset = get_preset(self.preset)
        except InputError as error:
            yield "preset", str(error).removeprefix("preset: ")  # the message names the field itself
        else:
            try:
                train_config = apply_overrides(preset, self.overrides)
            except InputError as error:
                yield "overrides", str(error)
        for text in self.predict:
            try:
                parse_prediction(text)
            except InputError as error:
                yield "predict", str(error)
        if self.device not in DEVICES:
            yield "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}"
        yield from self._ladder_problems(train_config)
        if self.parity_tokens < 1:
            yield "parity_tokens", f"must be at least 1, got {self.parity_tokens}"
        if self.parity_ctx < MIN_PARITY_CTX:
            yield "parity_ctx", f"must be at least {MIN_PARITY_CTX} (half of each window is context), got {self.parity_ctx}"
        yield from _choice_problems("parity_engines", self.parity_engines, [TORCH, LLAMA_CPP])
        if not self.parity_engines:
            yield "parity_engines", f"must name at least one of {TORCH}, {LLAMA_CPP}"

    def _ladder_problems(self, train_config: Any) -> Iterator[tuple[str, str]]:
        try:
            ladder = parse_ladder(self.quant_types)
        except InputError as error:
            yield "quant_types", str(error)
        else:
            if QUANT_TYPE not in (entry.type for entry in ladder):
                yield "quant_types", f"must include {QUANT_TYPE} (the gated quant)"
        try:
            settings = parse_imatrix(self.imatrix)
        except InputError as error:
            yield "imatrix", str(error)
        else:
            # A trained model's context is known now; an imported one's only after the import.
            context = train_config.model.max_position_embeddings if train_config and self.source == "train" else None
            if settings and context is not None and settings.ctx > context:
                yield "imatrix", f"ctx {settings.ctx}: longer than the model's {context} positions (max_position_embeddings)"

    @property
    def ladder(self) -> list[LadderEntry]:
        """The GGUF files to release, in `quant_types` order (checked when the spec was made)."""
        return parse_ladder(self.quant_types)

    @property
    def imatrix_settings(self) -> ImatrixSettings | None:
        return parse_imatrix(self.imatrix)


def _name_problem(name: str) -> str | None:
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_CHARS:
        return f"at most {MAX_NAME_CHARS} characters (a Hub repo name), got {len(name)}"
    if not PLAIN_NAME.fullmatch(name):
        return "only letters, digits, '.', '_' and '-' (it is a folder name under out)"
    if name.startswith(".") or ".." in name:
        return "must not start with '.' or contain '..' (it is a folder name under out)"
    if name in (STATE_FILE, SUMMARY_FILE):
        return f"{name} is ship's own file in out"
    return None


def _choice_problems(field_name: str, values: list[str], known: list[str]) -> Iterator[tuple[str, str]]:
    for value in values:
        if value not in known:
            yield field_name, f"unknown {value!r} (known: {', '.join(known)})"
    if len(set(values)) != len(values):
        yield field_name, f"lists a value twice: {values}"


@dataclass
class ShipConfig:
    out: Path = DEFAULT_OUT
    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec()])
    push: bool = False  # False: `shipkit push --dry-run` only
    allow_failed_gates: bool = False


def load_ship_config(path: str | Path) -> ShipConfig:
    """Read a ship TOML (`[ship]` table + one `[[model]]` table per model); paths in it are
    relative to the file's folder. Every value is checked against its field's declared type
    and its rules before any stage runs. Format: docs/ship.md."""
    path = Path(path)
    data = _read_toml(path)
    ship = data.pop("ship", {})
    models = data.pop("model", [])
    if data:
        raise InputError(f"{path}: unknown table(s) {', '.join(sorted(data))} (expected [ship] and [[model]])")
    if not isinstance(ship, dict):
        raise InputError(f"{path}: ship must be a table ([ship])")
    if not isinstance(models, list) or not all(isinstance(table, dict) for table in models):
        raise InputError(f"{path}: model must be an array of tables ([[model]])")
    if not models:
        raise InputError(f"{path}: no [[model]] table")
    _reject_unknown(ship, {f.name for f in dataclasses.fields(ShipConfig)} - {"models"}, f"{path}: [ship]")
    _check_types(ship, ShipConfig, f"{path}: [ship]")
    specs = [_model_spec(table, index, path) for index, table in enumerate(models, start=1)]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise InputError(f"{path}: model names must be unique, got {names}")
    ship = dict(ship)
    out = ship.pop("out", str(DEFAULT_OUT))
    if not out:
        raise InputError(f"{path}: [ship]: field out: must not be empty (default {DEFAULT_OUT})")
    return ShipConfig(out=path.parent / out, models=specs, **ship)


def _read_toml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the ship TOML file")
    if not path.is_file():
        raise InputError(f"{path}: ship config not found")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (TOML files are UTF-8)") from None
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{path}: not valid TOML ({error})") from None


def _model_spec(table: dict[str, Any], index: int, path: Path) -> ModelSpec:
    """One `[[model]]` table, typed, its paths made relative to the config's folder."""
    name = table.get("name", DEFAULT_MODEL_NAME)
    where = f"{path}: model {name if isinstance(name, str) and name else f'#{index}'}"
    _reject_unknown(table, {f.name for f in dataclasses.fields(ModelSpec)}, where)
    _check_types(table, ModelSpec, where)
    table = dict(table)
    base = path.parent
    table["corpus"] = [str(base / item) for item in table.get("corpus", [])]
    for key in ("hf_dir", "contract", "card_templates"):
        if table.get(key):
            table[key] = str(base / table[key])
    return ModelSpec(**table)


def _reject_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)}")


def _check_types(table: dict[str, Any], config_class: type, where: str) -> None:
    """Each TOML value against the declared type of `config_class`'s field of that name: TOML
    has its own types, and `push = "false"` must not read as true."""
    hints = typing.get_type_hints(config_class)
    for name, value in table.items():
        if not _fits(value, hints[name]):
            raise InputError(f"{where}: field {name}: expected {_type_name(hints[name])}, "
                             f"got {_describe_misfit(value, hints[name])}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict)  # TOML keys are strings; presets checks override values
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint in (str, Path):
        return isinstance(value, str)
    raise TypeError(f"no TOML rule for a field of type {hint}")  # a new field type needs one above


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args if arg is not type(None))
    if origin is list:
        return f"a list of {_plural_type_name(args[0])}"
    if origin is dict:
        return "a table"
    return TOML_TYPE_NAMES[hint][0]


def _plural_type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_plural_type_name(arg) for arg in typing.get_args(hint))
    return TOML_TYPE_NAMES[origin or hint][1]


def _describe_misfit(value: Any, hint: Any) -> str:
    """The value, or for a list of the right kind the first item that does not fit."""
    if isinstance(value, list) and typing.get_origin(hint) is list:
        item_hint = typing.get_args(hint)[0]
        position, item = next((k, item) for k, item in enumerate(value, start=1) if not _fits(item, item_hint))
        return f"{_describe(item)} at position {position}"
    return _describe(value)


def _describe(value: Any) -> str:
    """A TOML value as the error names it: its TOML type and (short) text."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= MAX_SHOWN_CHARS else value[:MAX_SHOWN_CHARS] + "…"
        return f"the string {shown!r}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a TOML {type(value).__name__}"  # date, time, datetime


def default_config(out: Path, *, repo: str | None = None, gguf_repo: str | None = None, push: bool = False,
                   device: str = "cpu") -> ShipConfig:
    """The embedded default: the stdlib corpus, the tiny preset, one model."""
    model = ModelSpec(repo=repo, gguf_repo=gguf_repo, device=device, predict=[DEFAULT_PREDICTION])
    return ShipConfig(out=out, models=[model], push=push)
