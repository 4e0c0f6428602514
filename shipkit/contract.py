"""The per-model contract: the thresholds each release gate enforces, each with its reason.

A contract is a TOML file (`docs/contracts.md`). shipkit ships one default,
`shipkit/contracts/default.toml`; a model's own file replaces the default's sections that it
contains (a whole top-level table at a time) and inherits the others. `[parity]` is read by
`shipkit parity`; `[train]`, `[model]`, `[card]` and `[release]` by `shipkit gates`.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from shipkit.errors import InputError

DEFAULT_CONTRACT = "default.toml"
ENGINES = ("torch", "llama.cpp")

# The metrics a contract may put a threshold on, per table; `shipkit.parity` produces exactly
# these names (docs/parity.md defines each).
PARITY_METRICS = (
    "kl_mean",
    "kl_p99",
    "kl_max",
    "same_top_pct",
    "ppl_ratio",
    "rms_dp_pct",
    "max_abs_dp_pct",
    "hidden_cosine_min",
)
AGREEMENT_METRICS = ("top1_pct", "kl_mean", "kl_max")
TENSOR_METRICS = ("rel_rmse",)
# `best_val_loss_vs_uniform` is best_val_loss / ln(vocab_size): 1.0 is a uniform guess.
TRAIN_METRICS = ("best_val_loss", "final_val_loss", "best_val_loss_vs_uniform", "wraps")
SECTIONS = ("contract", "parity", "train", "model", "card", "release")


@dataclass(frozen=True)
class Threshold:
    """`value <= limit` (direction "max") or `value >= limit` ("min"); a missing or
    non-finite value never passes."""

    limit: float
    direction: str
    reason: str

    def passes(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value <= self.limit if self.direction == "max" else value >= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {"limit": self.limit, "direction": self.direction, "reason": self.reason}


@dataclass(frozen=True)
class SizeBand:
    """Thresholds loosened for models of at most `max_parameters` stored parameters: the
    reference ones (`thresholds`) and, per GGUF file type, that type's (`file_types`)."""

    name: str
    max_parameters: int
    reason: str
    thresholds: dict[str, Threshold]
    file_types: dict[str, dict[str, Threshold]] = field(default_factory=dict)


@dataclass(frozen=True)
class FileTypeBand:
    """`[parity.file_types.<TYPE>]`: one GGUF file type's limits at the reference size, and the
    published row they come from."""

    reference: str
    thresholds: dict[str, Threshold]
    tensors: dict[str, Threshold] = field(default_factory=dict)  # overrides `[parity.tensors]`


@dataclass(frozen=True)
class AppliedBand:
    """The thresholds that gate one GGUF: its file type's band at the model's size band.
    `file_type` is None where the contract has no band for the type, so the reference
    thresholds apply."""

    file_type: str | None
    size_band: str
    reference: str  # where the limits come from
    reason: str  # why the size band loosens them ("" at the reference size)
    thresholds: dict[str, Threshold]
    tensors: dict[str, Threshold]  # the tensor check's

    @property
    def name(self) -> str:
        return f"{self.file_type or 'reference'} / {self.size_band}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file_type": self.file_type, "size_band": self.size_band,
                "reference": self.reference, "reason": self.reason}


@dataclass(frozen=True)
class ParityContract:
    """`[parity]`: what `shipkit parity` must see for the gate to pass."""

    reference: str
    required_engines: tuple[str, ...]  # for the first (primary) file of a run
    thresholds: dict[str, Threshold]
    size_bands: tuple[SizeBand, ...] = ()
    agreement: dict[str, Threshold] = field(default_factory=dict)
    tensors: dict[str, Threshold] = field(default_factory=dict)
    every_file_engines: tuple[str, ...] = (ENGINES[0],)  # for each further file of a run
    reference_file_type: str | None = None  # the file type `thresholds` are written for
    file_types: dict[str, FileTypeBand] = field(default_factory=dict)

    def size_band(self, parameters: int) -> SizeBand | None:
        """The smallest size band holding a model of `parameters`, None for the reference size."""
        for band in sorted(self.size_bands, key=lambda b: b.max_parameters):
            if parameters <= band.max_parameters:
                return band
        return None

    def thresholds_for(self, parameters: int) -> tuple[str, dict[str, Threshold]]:
        """The size band that applies to a model of `parameters` ("reference" when none does)
        and its thresholds for a file type the contract gives no band of its own."""
        band = self.size_band(parameters)
        if band is None:
            return "reference", dict(self.thresholds)
        return band.name, {**self.thresholds, **band.thresholds}

    def band_for(self, parameters: int, file_type: str | None) -> AppliedBand:
        """What gates a GGUF of `file_type` (e.g. "Q8_0") made from a model of `parameters`: the
        reference thresholds, the size band's, then the file type's own and the size band's for
        that type, each overriding the metrics it names; the tensor check's limit is the file
        type's where it sets one."""
        size_name, thresholds = self.thresholds_for(parameters)
        size = self.size_band(parameters)
        reason = size.reason if size is not None else ""
        typed = self.file_types.get(file_type) if file_type is not None else None
        if typed is None:
            own = file_type if file_type is not None and file_type == self.reference_file_type else None
            return AppliedBand(own, size_name, self.reference, reason, thresholds, dict(self.tensors))
        thresholds |= typed.thresholds
        if size is not None:
            thresholds |= size.file_types.get(file_type, {})
        return AppliedBand(file_type, size_name, typed.reference, reason, thresholds, {**self.tensors, **typed.tensors})


@dataclass(frozen=True)
class Expectation:
    """A required value (a list of allowed names, a count) and why."""

    value: Any
    reason: str


@dataclass(frozen=True)
class Band:
    """`minimum <= value <= maximum`."""

    minimum: float
    maximum: float
    reason: str

    def holds(self, value: float | None) -> bool:
        return value is not None and self.minimum <= value <= self.maximum


@dataclass(frozen=True)
class TrainContract:
    """`[train]`: thresholds on the training summary (metrics in TRAIN_METRICS)."""

    thresholds: dict[str, Threshold] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelContract:
    """`[model]`: what the released checkpoint must be."""

    parameters: Band | None = None
    architectures: Expectation | None = None  # value: tuple of allowed architectures
    tensor_count: Expectation | None = None  # value: int, checked besides the config's own count


@dataclass(frozen=True)
class CardContract:
    """`[card]`: front-matter keys the safetensors card must carry."""

    required_fields: Expectation | None = None  # value: tuple of keys


@dataclass(frozen=True)
class ReleaseContract:
    """`[release]`: what the release folder must hold."""

    licenses: Expectation | None = None  # value: tuple of allowed license ids; None allows any
    quants: Expectation | None = None  # value: tuple of GGUF file types, e.g. ("Q4_K_M",)
    hf_files: Expectation | None = None  # value: tuple of file names in release/hf


@dataclass(frozen=True)
class Contract:
    name: str
    source: str  # the file(s) it was read from
    parity: ParityContract
    train: TrainContract
    model: ModelContract
    card: CardContract
    release: ReleaseContract


def file_type_name(file_type: int) -> str:
    """A GGUF's `general.file_type` as llama-quantize names the type ("Q4_K_M", "BF16", "F32"),
    or "unknown(N)" for a number gguf-py does not know."""
    import gguf

    try:
        name = gguf.LlamaFileType(file_type).name
    except ValueError:
        return f"unknown({file_type})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def load_contract(path: str | Path | None = None) -> Contract:
    """The packaged default contract, or `path`'s sections over it.

    Raises InputError naming the file and field when the TOML is malformed, a table is
    unknown, or a threshold lacks its limit or reason.
    """
    default_text = resources.files("shipkit.contracts").joinpath(DEFAULT_CONTRACT).read_text()
    tables = _parse_toml(default_text, f"shipkit/contracts/{DEFAULT_CONTRACT}")
    source = f"shipkit/contracts/{DEFAULT_CONTRACT}"
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise InputError(f"{path}: cannot read the contract ({error.strerror})") from None
        override = _parse_toml(text, str(path))
        tables.update(override)
        source = f"{path} (over {source})"
    where = str(path) if path is not None else source
    name = _table(tables, "contract", where).get("name", "unnamed")
    return Contract(
        name=str(name),
        source=source,
        parity=_parse_parity(_table(tables, "parity", where), where),
        train=_parse_train(_table(tables, "train", where), where),
        model=_parse_model(_table(tables, "model", where), where),
        card=_parse_card(_table(tables, "card", where), where),
        release=_parse_release(_table(tables, "release", where), where),
    )


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{where}: not valid TOML ({error})") from None
    unknown = sorted(set(tables) - set(SECTIONS))
    if unknown:
        raise InputError(f"{where}: unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    return tables


def _table(tables: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = tables.get(key, {})
    if not isinstance(value, dict):
        raise InputError(f"{where}: field {key}: expected a table")
    return value


def _parse_parity(table: dict[str, Any], where: str) -> ParityContract:
    known = {"reference", "required_engines", "every_file_engines", "reference_file_type", "thresholds",
             "size_bands", "agreement", "tensors", "file_types"}
    _reject_unknown(table, known, f"{where}: [parity]")
    bands = []
    for index, band in enumerate(table.get("size_bands", [])):
        label = f"parity.size_bands[{index}]"
        _reject_unknown(band, {"name", "max_parameters", "reason", "thresholds", "file_types"}, f"{where}: [{label}]")
        for key in ("name", "max_parameters", "reason"):
            if key not in band:
                raise InputError(f"{where}: field {label}.{key}: missing")
        types = _file_type_tables(band, f"{label}.file_types", where)
        bands.append(
            SizeBand(
                name=str(band["name"]),
                max_parameters=int(band["max_parameters"]),
                reason=str(band["reason"]),
                thresholds=_thresholds(band.get("thresholds", {}), PARITY_METRICS, f"{label}.thresholds", where),
                file_types={name: _thresholds(entry, PARITY_METRICS, f"{label}.file_types.{name}", where)
                            for name, entry in types.items()},
            )
        )
    file_types = {}
    for name, entry in _file_type_tables(table, "parity.file_types", where).items():
        label = f"parity.file_types.{name}"
        _reject_unknown(entry, {"reference", "thresholds", "tensors"}, f"{where}: field {label}")
        if not str(entry.get("reference", "")).strip():
            raise InputError(f"{where}: field {label}.reference: every file type band names its source")
        file_types[name] = FileTypeBand(
            reference=str(entry["reference"]),
            thresholds=_thresholds(entry.get("thresholds", {}), PARITY_METRICS, f"{label}.thresholds", where),
            tensors=_thresholds(entry.get("tensors", {}), TENSOR_METRICS, f"{label}.tensors", where))
    return ParityContract(
        reference=str(table.get("reference", "")),
        required_engines=_engines(table, "required_engines", ENGINES, where),
        thresholds=_thresholds(table.get("thresholds", {}), PARITY_METRICS, "parity.thresholds", where),
        size_bands=tuple(bands),
        agreement=_thresholds(table.get("agreement", {}), AGREEMENT_METRICS, "parity.agreement", where),
        tensors=_thresholds(table.get("tensors", {}), TENSOR_METRICS, "parity.tensors", where),
        every_file_engines=_engines(table, "every_file_engines", (ENGINES[0],), where),
        reference_file_type=_reference_file_type(table, where),
        file_types=file_types,
    )


def _engines(table: dict[str, Any], key: str, default: tuple[str, ...], where: str) -> tuple[str, ...]:
    engines = tuple(table.get(key, default))
    bad = [engine for engine in engines if engine not in ENGINES]
    if bad:
        raise InputError(f"{where}: field parity.{key}: unknown engine(s) {bad} (known: {list(ENGINES)})")
    return engines


def _reference_file_type(table: dict[str, Any], where: str) -> str | None:
    name = table.get("reference_file_type")
    if name is None:
        return None
    if str(name) not in _known_file_types():
        raise InputError(f"{where}: field parity.reference_file_type: unknown GGUF file type {name!r}")
    return str(name)


def _known_file_types() -> set[str]:
    """Every GGUF file type as llama-quantize names it."""
    import gguf

    return {file_type_name(member) for member in gguf.LlamaFileType if member != gguf.LlamaFileType.GUESSED}


def _file_type_tables(table: dict[str, Any], label: str, where: str) -> dict[str, dict[str, Any]]:
    """`table["file_types"]`, each key a GGUF file type as llama-quantize names it and each value
    a table: a misspelt type would silently never apply, so it is an error."""
    types = table.get("file_types", {})
    if not isinstance(types, dict):
        raise InputError(f"{where}: field {label}: expected a table of file types")
    if not types:
        return {}
    known = _known_file_types()
    for name, entry in types.items():
        if name not in known:
            raise InputError(f"{where}: field {label}.{name}: unknown GGUF file type (known: {', '.join(sorted(known))})")
        if not isinstance(entry, dict):
            raise InputError(f"{where}: field {label}.{name}: expected a table")
    return types


def _parse_train(table: dict[str, Any], where: str) -> TrainContract:
    _reject_unknown(table, {"thresholds"}, f"{where}: [train]")
    return TrainContract(thresholds=_thresholds(table.get("thresholds", {}), TRAIN_METRICS, "train.thresholds", where))


def _parse_model(table: dict[str, Any], where: str) -> ModelContract:
    _reject_unknown(table, {"parameters", "architectures", "tensor_count"}, f"{where}: [model]")
    parameters = None
    if "parameters" in table:
        entry = _entry(table["parameters"], {"min", "max", "reason"}, "model.parameters", where)
        limits = [_number(entry, key, "model.parameters", where) for key in ("min", "max")]
        if limits[0] > limits[1]:
            raise InputError(f"{where}: field model.parameters: min {limits[0]:g} exceeds max {limits[1]:g}")
        parameters = Band(minimum=limits[0], maximum=limits[1], reason=str(entry["reason"]))
    tensor_count = _expectation(table, "tensor_count", "model", where, int)
    if tensor_count is not None and tensor_count.value < 1:
        raise InputError(f"{where}: field model.tensor_count.value: must be at least 1")
    return ModelContract(
        parameters=parameters,
        architectures=_expectation(table, "architectures", "model", where, list),
        tensor_count=tensor_count,
    )


def _parse_card(table: dict[str, Any], where: str) -> CardContract:
    _reject_unknown(table, {"required_fields"}, f"{where}: [card]")
    return CardContract(required_fields=_expectation(table, "required_fields", "card", where, list))


def _parse_release(table: dict[str, Any], where: str) -> ReleaseContract:
    _reject_unknown(table, {"licenses", "quants", "hf_files"}, f"{where}: [release]")
    return ReleaseContract(**{key: _expectation(table, key, "release", where, list)
                              for key in ("licenses", "quants", "hf_files")})


def _expectation(table: dict[str, Any], key: str, section: str, where: str, kind: type) -> Expectation | None:
    """`key = {value = ..., reason = "..."}`; lists become tuples of strings."""
    if key not in table:
        return None
    label = f"{section}.{key}"
    entry = _entry(table[key], {"value", "reason"}, label, where)
    value = entry.get("value")
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise InputError(f"{where}: field {label}.value: expected a list of names")
        return Expectation(value=tuple(value), reason=str(entry["reason"]))
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: field {label}.value: expected an integer")
    return Expectation(value=value, reason=str(entry["reason"]))


def _entry(entry: Any, known: set[str], label: str, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: field {label}: expected a table with {', '.join(sorted(known))}")
    _reject_unknown(entry, known, f"{where}: field {label}")
    if not str(entry.get("reason", "")).strip():
        raise InputError(f"{where}: field {label}.reason: every expectation needs a reason")
    return entry


def _number(entry: dict[str, Any], key: str, label: str, where: str) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: field {label}.{key}: expected a number")
    return float(value)


def _thresholds(table: dict[str, Any], metrics: tuple[str, ...], label: str, where: str) -> dict[str, Threshold]:
    thresholds = {}
    for metric, entry in table.items():
        field_name = f"{label}.{metric}"
        if metric not in metrics:
            raise InputError(f"{where}: field {field_name}: unknown metric (known: {', '.join(metrics)})")
        if not isinstance(entry, dict):
            raise InputError(f"{where}: field {field_name}: expected a table with max or min, and reason")
        _reject_unknown(entry, {"max", "min", "reason"}, f"{where}: field {field_name}")
        directions = [direction for direction in ("max", "min") if direction in entry]
        if len(directions) != 1:
            raise InputError(f"{where}: field {field_name}: give exactly one of max or min")
        if not str(entry.get("reason", "")).strip():
            raise InputError(f"{where}: field {field_name}.reason: every threshold needs a reason")
        limit = entry[directions[0]]
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise InputError(f"{where}: field {field_name}.{directions[0]}: expected a number")
        thresholds[metric] = Threshold(limit=float(limit), direction=directions[0], reason=str(entry["reason"]))
    return thresholds


def _reject_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
