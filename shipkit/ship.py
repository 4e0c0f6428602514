"""`shipkit ship`: the whole release, one or more models, from one TOML file (or the embedded default).

Per model, under `OUT/<name>/`:

    train path:   corpus → tokens (+ audit) → run (train) → validate → export → quantize
                  → parity → card → gates → push
    import path:  run/ckpt/best.apr (import) → corpus → tokens (with the model's tokenizer)
                  → validate → export → quantize → parity → card → gates → push

Every stage that finishes records a fingerprint of what it was asked to do (its settings and
the outputs of the stages it reads) and the sha256 of every file it wrote in
`OUT/ship-state.json`. A re-run skips a stage whose fingerprint is unchanged and whose outputs
still hash the same, so an interrupted ship resumes where it stopped; an interrupted training
run continues from its last epoch.

Nothing is written or deleted outside OUT: model names are plain folder names, every deletion is
checked to lie inside OUT, and a symbolic link under OUT/<name> that leads outside OUT is refused
before any stage runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tomllib
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shipkit.errors import GateFailed, InputError, IntegrityError, ShipkitError
from shipkit.fsutil import check_folder_target, sha256_file, write_json

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
MIN_PARITY_CTX = 4  # shipkit.parity.eval_windows: the first half of each window is context
# How the TOML types are named in errors: (one value, a list of them).
TOML_TYPE_NAMES: dict[Any, tuple[str, str]] = {
    bool: ("true or false", "true/false values"),
    int: ("an integer", "integers"),
    float: ("a finite number", "finite numbers"),
    str: ("a string", "strings"),
    Path: ("a string (a path)", "paths"),
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
    quant_types: list[str] = field(default_factory=lambda: [QUANT_TYPE])
    parity_tokens: int = 8192
    parity_ctx: int = 256
    parity_engines: list[str] = field(default_factory=lambda: ["torch", "llama.cpp"])
    contract: str | None = None
    repo: str | None = None
    gguf_repo: str | None = None
    datasets: list[str] = field(default_factory=list)

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
        from shipkit.presets import apply_overrides, get_preset
        from shipkit.quantize.mix import FILE_TYPES
        from shipkit.tokenize import MIN_VOCAB_SIZE

        if self.source not in SOURCES:
            yield "source", f"must be 'train' or 'import', got {self.source!r}"
        if self.source == "import" and not self.hf_dir:
            yield "hf_dir", "required when source = 'import'"
        if not 0 < self.val_fraction < 1:
            yield "val_fraction", f"must be between 0 and 1 (exclusive), got {self.val_fraction}"
        if self.vocab_size < MIN_VOCAB_SIZE:
            yield "vocab_size", f"must be at least {MIN_VOCAB_SIZE} (256 bytes + end of text), got {self.vocab_size}"
        try:
            preset = get_preset(self.preset)
        except InputError as error:
            yield "preset", str(error)
        else:
            try:
                apply_overrides(preset, self.overrides)
            except InputError as error:
                yield "overrides", str(error)
        for text in self.predict:
            try:
                parse_prediction(text)
            except InputError as error:
                yield "predict", str(error)
        if self.device not in DEVICES:
            yield "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}"
        yield from _choice_problems("quant_types", self.quant_types, list(FILE_TYPES))
        if QUANT_TYPE not in self.quant_types:
            yield "quant_types", f"must include {QUANT_TYPE} (the gated quant)"
        if self.parity_tokens < 1:
            yield "parity_tokens", f"must be at least 1, got {self.parity_tokens}"
        if self.parity_ctx < MIN_PARITY_CTX:
            yield "parity_ctx", f"must be at least {MIN_PARITY_CTX} (half of each window is context), got {self.parity_ctx}"
        yield from _choice_problems("parity_engines", self.parity_engines, [TORCH, LLAMA_CPP])
        if not self.parity_engines:
            yield "parity_engines", f"must name at least one of {TORCH}, {LLAMA_CPP}"


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
    for key in ("hf_dir", "contract"):
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
        return f"a list of {TOML_TYPE_NAMES[args[0]][1]}"
    if origin is dict:
        return "a table"
    return TOML_TYPE_NAMES[hint][0]


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
        return path.is_file() and _is_inside(self.out, path)

    def record(self, key: str, fingerprint: str, outputs: list[Path]) -> None:
        files = sorted(p for output in outputs for p in _files_under(output))
        self.stages[key] = {"fingerprint": fingerprint, "outputs": {str(p): sha256_file(p) for p in files}}
        write_json(self.path, self.stages)

    def outputs_digest(self, key: str) -> str:
        return _digest(self.stages[key]["outputs"])


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


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StageResult:
    stage: str
    skipped: bool
    detail: str


@dataclass
class ModelResult:
    name: str
    run_dir: Path
    stages: list[StageResult]
    summary: dict[str, Any]


@dataclass
class ShipReport:
    out: Path
    models: list[ModelResult]


class ModelShipper:
    """Runs one model's stages in order through the ledger."""

    def __init__(self, spec: ModelSpec, config: ShipConfig, ledger: StageLedger,
                 log: Callable[[str], None]) -> None:
        self.spec, self.config, self.ledger, self.log = spec, config, ledger, log
        self.root = config.out / spec.name
        self.corpus_dir = self.root / "corpus"
        self.tokens_dir = self.root / "tokens"
        self.run_dir = self.root / "run"
        self.checkpoint = self.run_dir / "ckpt" / "best.apr"
        self.stages: list[StageResult] = []

    def stage(self, name: str, settings: dict[str, Any], reads: list[str], outputs: list[Path],
              action: Callable[[], str]) -> None:
        key = f"{self.spec.name}/{name}"
        fingerprint = _digest({"settings": settings,
                               "reads": {r: self.ledger.outputs_digest(f"{self.spec.name}/{r}") for r in reads}})
        if self.ledger.is_done(key, fingerprint):
            self.stages.append(StageResult(name, True, "unchanged, skipped"))
            self.log(f"[{self.spec.name}] {name}: unchanged, skipped")
            return
        self.log(f"[{self.spec.name}] {name} …")
        detail = action()
        self.ledger.record(key, fingerprint, outputs)
        self.stages.append(StageResult(name, False, detail))
        self.log(f"[{self.spec.name}] {name}: {detail}")

    def run(self) -> ModelResult:
        spec = self.spec
        if spec.source == "import":
            self.stage("import", {"hf_dir": spec.hf_dir, "hf": _folder_digest(Path(spec.hf_dir)),
                                  "base_model": spec.base_model, "license": spec.license, "pre": spec.pre},
                       [], [self.checkpoint.parent, self.run_dir / "tokenizer.json"], self._import)
        self.stage("corpus", self._corpus_settings(), [], [self.corpus_dir], self._corpus)
        tokenizer_reads = ["import"] if spec.source == "import" else []
        self.stage("tokens", {"vocab_size": spec.vocab_size, "source": spec.source},
                   ["corpus", *tokenizer_reads], [self.tokens_dir], self._tokens)
        if spec.source == "train":
            self.stage("train", {"preset": spec.preset, "overrides": spec.overrides, "predict": spec.predict,
                                 "device": spec.device}, ["tokens"],
                       [self.run_dir / "ckpt", self.run_dir / "evidence" / "training-summary.json"], self._train)
        weights_stage = "train" if spec.source == "train" else "import"
        self.stage("validate", {}, [weights_stage], [self.checkpoint], self._validate)
        self.stage("export", {}, [weights_stage], [self.run_dir / "release" / "hf"], self._export)
        self.stage("quantize", {"types": spec.quant_types}, [weights_stage],
                   [self.run_dir / "release" / "gguf"], self._quantize)
        self.stage("parity", {"tokens": spec.parity_tokens, "ctx": spec.parity_ctx,
                              "engines": spec.parity_engines, "contract": _file_digest(spec.contract)},
                   ["quantize", "tokens"], [self.run_dir / "evidence" / "parity.json"], self._parity)
        self.stage("card", {"repo": self._repo(), "gguf_repo": spec.gguf_repo, "license": spec.license,
                            "datasets": spec.datasets}, ["export", "quantize", "parity"],
                   [self.run_dir / "release" / "card", self.run_dir / "evidence" / "release.json"], self._card)
        gates = self._gates()
        push = self._push()
        return ModelResult(spec.name, self.run_dir, self.stages, self._summary(gates, push))

    def _corpus_settings(self) -> dict[str, Any]:
        spec = self.spec
        sources = [str(Path(s).resolve()) for s in spec.corpus] or ["<stdlib>"]
        return {"sources": sources, "text_column": spec.text_column, "glob": spec.glob,
                "val_fraction": spec.val_fraction}

    def _import(self) -> str:
        from shipkit.hf_import import import_hf
        from shipkit.tokenize import copy_tokenizer

        report = import_hf(self.spec.hf_dir, self.checkpoint, base_model=self.spec.base_model,
                           license=self.spec.license, pre=self.spec.pre)
        copy_tokenizer(report.tokenizer_path, self.run_dir)
        return f"{report.architecture}, {report.tensor_count} tensors, {report.parameters:,} parameters"

    def _remove(self, path: Path) -> None:
        """Delete a stage's old output, after checking that it lies inside OUT."""
        _require_inside(self.config.out, path)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)

    def _corpus(self) -> str:
        from shipkit.corpus import CorpusConfig, build_corpus, default_source

        sources = [Path(s) for s in self.spec.corpus] or [default_source()]
        self._remove(self.corpus_dir)
        manifest = build_corpus(sources, self.corpus_dir, CorpusConfig(
            val_fraction=self.spec.val_fraction, text_column=self.spec.text_column, glob=self.spec.glob))
        splits = manifest["splits"]
        return f"train {splits['train']['docs']} docs, val {splits['val']['docs']} docs"

    def _tokens(self) -> str:
        from shipkit.audit import audit_tokens
        from shipkit.tokenize import TokenizerConfig, encode_corpus, train_tokenizer

        self._remove(self.tokens_dir)
        if self.spec.source == "import":
            manifest = encode_corpus(self.corpus_dir, self.tokens_dir, self.run_dir / "tokenizer.json")
        else:
            train_tokenizer(self.corpus_dir, self.tokens_dir, TokenizerConfig(vocab_size=self.spec.vocab_size))
            manifest = encode_corpus(self.corpus_dir, self.tokens_dir)
        audit = audit_tokens(self.tokens_dir)
        totals = manifest["splits"]
        if audit["val_docs_in_train"]:
            raise GateFailed(f"{self.tokens_dir}: {audit['val_docs_in_train']} val documents also in train")
        return (f"train {totals['train']['tokens']:,} tokens, val {totals['val']['tokens']:,} tokens; "
                f"audit: 0 val docs in train, {audit['window_overlap_fraction']:.2%} of val "
                f"{audit['window']}-token windows seen in train")

    def _train(self) -> str:
        from shipkit.presets import apply_overrides, get_preset
        from shipkit.train import resume, run_dir_lock, train

        if self._interrupted_training():
            evidence = resume(self.run_dir, data_dir=self.tokens_dir, device=self.spec.device,
                              compile_model=self.spec.compile)
        else:
            with run_dir_lock(self.run_dir):  # never delete a run another `shipkit train` is writing
                self._remove(self.run_dir)
            config = apply_overrides(get_preset(self.spec.preset), self.spec.overrides)
            evidence = train(config, self.tokens_dir, self.run_dir, device=self.spec.device,
                             compile_model=self.spec.compile, predictions=self.spec.predict)
        summary, verdict = evidence["summary"], evidence["summary"]["memorization"]
        early = " (stopped early)" if summary["stop_reason"] == "early_stop" else ""
        turn = f", turned at epoch {verdict['turn_epoch']}" if verdict["turn_epoch"] else ""
        return (f"{summary['epochs_completed']} epochs{early}, best val loss {summary['best_val_loss']:.4f} "
                f"(epoch {summary['best_epoch']}), verdict {verdict['verdict']}{turn}")

    def _interrupted_training(self) -> bool:
        """A run of this ship that stopped mid-way (its evidence still says "running") and left
        a resume file; anything else is trained again from scratch."""
        from shipkit.evidence import evidence_path, read_evidence

        if not evidence_path(self.run_dir, "training-summary").is_file():
            return False
        if not any((self.run_dir / "ckpt").glob("epoch-*.resume.apr")):
            return False
        return read_evidence(self.run_dir, "training-summary")["summary"]["status"] == "running"

    def _validate(self) -> str:
        from shipkit.apr import validate_apr

        report = validate_apr(self.checkpoint)
        if not report.ok:
            raise IntegrityError(f"{self.checkpoint}: {report.problems[0]}")
        return f"APR v{report.version} / {report.tensor_count} tensors / checksum VALID"

    def _export(self) -> str:
        from shipkit.export import export_hf

        # the new folder replaces the old one only once complete; nothing but the export in it
        report = export_hf(self.checkpoint, self.run_dir / "release" / "hf", keep_other_files=False)
        return f"{len(report.files)} files, {report.shards} safetensors file(s)"

    def _quantize(self) -> str:
        from shipkit.quantize import write_gguf

        out = self.run_dir / "release" / "gguf"
        made = []
        for qtype in self.spec.quant_types:  # each replaces its old file only once complete
            result = write_gguf(self.checkpoint, out, qtype, device=_quant_device(self.spec.device),
                                base_name=self.spec.name)
            made.append(Path(result.path).name)
        for stale in out.iterdir():  # the folder holds exactly this release's GGUF files
            if stale.name not in made:
                self._remove(stale)
        return ", ".join(made)

    def _parity(self) -> str:
        from shipkit.parity import ParityOptions, run_parity

        evidence = run_parity(ParityOptions(
            base=self.checkpoint, quant=self._gguf(QUANT_TYPE), tokens_dir=self.tokens_dir,
            n_tokens=self.spec.parity_tokens, ctx=self.spec.parity_ctx, engines=tuple(self.spec.parity_engines),
            device=self.spec.device, contract=Path(self.spec.contract) if self.spec.contract else None,
            run_dir=self.run_dir))
        return f"verdict {evidence['verdict']}"

    def _card(self) -> str:
        from shipkit.card import render_card

        report = render_card(self.run_dir, repo_id=self._repo(), gguf_repo_id=self.spec.gguf_repo,
                             license=self.spec.license, datasets=self.spec.datasets)
        return ", ".join(str(Path(path).relative_to(self.run_dir)) for path in report.cards.values())

    def _gates(self) -> dict[str, Any]:
        from shipkit.gates import run_gates

        self.log(f"[{self.spec.name}] gates …")
        scoreboard = run_gates(self.run_dir, contract=self.spec.contract)
        self.stages.append(StageResult("gates", False, scoreboard["summary"]))
        self.log(f"[{self.spec.name}] gates: {scoreboard['summary']}")
        return scoreboard

    def _push(self) -> dict[str, Any]:
        from shipkit.push import push_release

        dry_run = not self.config.push
        report = push_release(self.run_dir, self._repo(),
                              gguf_repo=self.spec.gguf_repo, dry_run=dry_run,
                              allow_failed_gates=self.config.allow_failed_gates)
        if dry_run and report.refusals and not self.config.allow_failed_gates:
            raise report.refusals[0]
        detail = ("dry run: " if dry_run else "") + (
            f"{report.total_files} files planned" if dry_run else f"verified {report.verified_files}/{report.total_files} files")
        self.stages.append(StageResult("push", False, detail))
        self.log(f"[{self.spec.name}] push: {detail}")
        return report.to_dict()

    def _repo(self) -> str:
        from shipkit.card import LOCAL_NAMESPACE

        return self.spec.repo or f"{LOCAL_NAMESPACE}/{self.spec.name}"

    def _gguf(self, qtype: str) -> Path:
        found = sorted((self.run_dir / "release" / "gguf").glob(f"*-{qtype}.gguf"))
        if not found:
            raise ShipkitError(f"{self.run_dir / 'release' / 'gguf'}: no {qtype} GGUF")
        return found[0]

    def _summary(self, gates: dict[str, Any], push: dict[str, Any]) -> dict[str, Any]:
        from shipkit.evidence import read_evidence

        parity = read_evidence(self.run_dir, "parity")
        training = None
        if (self.run_dir / "evidence" / "training-summary.json").is_file():
            training = read_evidence(self.run_dir, "training-summary")["summary"]
        files = [{"repo": repo["repo_id"], "path": f["path_in_repo"], "size": f["size"], "sha256": f["sha256"]}
                 for repo in push["repos"] for f in repo["files"]]
        return {
            "best_val_loss": training["best_val_loss"] if training else None,
            "memorization": training["memorization"]["verdict"] if training else None,
            "parity": {"verdict": parity["verdict"], **_parity_headline(parity)},
            "gates": gates["summary"],
            "gates_verdict": gates["verdict"],
            "gates_open": [{key: gate[key] for key in ("id", "status", "detail")}
                           for gate in gates["gates"] if gate["status"] != "DISCHARGED"],
            "files": files,
            "push": "dry run" if push["dry_run"] else f"verified {push['verified_files']}/{push['total_files']}",
        }


def _parity_headline(parity: dict[str, Any]) -> dict[str, Any]:
    """The torch engine's headline metrics from evidence/parity.json."""
    engine = parity["engines"].get("torch") or next(iter(parity["engines"].values()))
    metrics = engine["metrics"]
    return {key: metrics.get(key) for key in ("kl_mean", "same_top_pct", "ppl_ratio")}


def _quant_device(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


def _file_digest(path: str | None) -> str | None:
    return sha256_file(path) if path else None


def _folder_digest(folder: Path) -> str:
    if not folder.is_dir():
        raise InputError(f"{folder}: hf_dir not found")
    return _digest({str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()})


def ship(config: ShipConfig, *, log: Callable[[str], None] = print) -> ShipReport:
    """Run every model of `config` to its release (or dry run); see the module docstring.

    Raises InputError, before any stage runs, when OUT is a file, a model's input is missing, or
    a model's folder holds a symbolic link leading outside OUT or would swallow one of its inputs."""
    check_folder_target(config.out, "out")
    for spec in config.models:
        _check_inputs_exist(spec)
        _check_model_folder(config.out, spec)
    config.out.mkdir(parents=True, exist_ok=True)
    ledger = StageLedger(config.out)
    results = [ModelShipper(spec, config, ledger, log).run() for spec in config.models]
    write_json(config.out / SUMMARY_FILE,
               {r.name: {"run_dir": str(r.run_dir), **r.summary} for r in results})
    return ShipReport(config.out, results)


def _check_inputs_exist(spec: ModelSpec) -> None:
    for source in spec.corpus:
        if not os.path.exists(source):
            raise InputError(f"model {spec.name}: field corpus: {source}: no such file or folder")
    if spec.hf_dir and not os.path.isdir(spec.hf_dir):
        raise InputError(f"model {spec.name}: field hf_dir: {spec.hf_dir}: no such folder")
    if spec.contract and not os.path.isfile(spec.contract):
        raise InputError(f"model {spec.name}: field contract: {spec.contract}: no such file")


def _check_model_folder(out: Path, spec: ModelSpec) -> None:
    """OUT/<name> stays inside OUT (stages write through the folders they find there, and delete
    whole stage folders) and holds none of the model's inputs."""
    root = out / spec.name
    check_folder_target(root, f"model {spec.name}")
    links = [root] if root.is_symlink() else []
    if root.is_dir() and not root.is_symlink():
        for folder, subfolders, files in os.walk(root):  # a link is listed, never entered
            links += [Path(folder) / name for name in subfolders + files if (Path(folder) / name).is_symlink()]
    for link in links:
        target = _real(link)
        if not _is_inside(out, target):
            raise InputError(f"{link}: a symbolic link to {target}, outside {out}; ship writes only "
                             "inside its output folder (remove the link)")
    inputs = {"corpus": spec.corpus, "hf_dir": [spec.hf_dir] if spec.hf_dir else [],
              "contract": [spec.contract] if spec.contract else []}
    for field_name, paths in inputs.items():
        for path in paths:
            if _is_inside(root, _real(Path(path))):
                raise InputError(f"model {spec.name}: field {field_name}: {path} lies inside the model's "
                                 f"output folder {root}, which ship rewrites; move it or rename the model")


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symbolic-link loop before Python 3.13
        raise InputError(f"{path}: a symbolic-link loop (remove the link)") from None


def _is_inside(folder: Path, path: Path) -> bool:
    """Whether `path` (its last component not followed, if a link) lies strictly inside `folder`."""
    try:
        location, root = path.parent.resolve() / path.name, folder.resolve()
    except (OSError, RuntimeError):  # a symbolic-link loop (RuntimeError before Python 3.13)
        return False
    return location != root and location.is_relative_to(root)


def _require_inside(out: Path, path: Path) -> None:
    if not _is_inside(out, path):
        raise ShipkitError(f"{path}: lies outside {out}; ship deletes only inside its output folder")


def default_config(out: Path, *, repo: str | None = None, gguf_repo: str | None = None, push: bool = False,
                   device: str = "cpu") -> ShipConfig:
    """The embedded default: the stdlib corpus, the tiny preset, one model."""
    model = ModelSpec(repo=repo, gguf_repo=gguf_repo, device=device, predict=[DEFAULT_PREDICTION])
    return ShipConfig(out=out, models=[model], push=push)
