"""The release gates: every claim a release makes, checked against the files and evidence that
back it, with a status per gate and the evidence it rests on.

Statuses: DISCHARGED (the evidence proves it), PARTIAL (the evidence is incomplete but nothing
contradicts it), FAILED (something contradicts it, or a required artefact is missing). Gates
never raise on a failed check; the scoreboard is the result. Gate by gate: docs/gates.md.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shipkit import __version__
from shipkit.apr import inspect_apr, validate_apr
from shipkit.config import ModelConfig
from shipkit.contract import Contract, Threshold, load_contract
from shipkit.errors import InputError, IntegrityError, ShipkitError
from shipkit.evidence import (
    DISCHARGED,
    FAIL,
    FAILED,
    GATE_STATUSES,
    GATES_EVIDENCE,
    PARITY_EVIDENCE,
    PARTIAL,
    PASS,
    RELEASE_EVIDENCE,
    SKIPPED,
    TRAINING_EVIDENCE,
    evidence_path,
    read_evidence,
    write_evidence,
)
from shipkit.fsutil import sha256_file
from shipkit.layout import RunDir
from shipkit.predict import CONFIRMED, FALSIFIED

SCHEMA_VERSION = 1
CATEGORIES = ("TRAIN", "CHECKPOINT", "PARITY", "CARD", "RELEASE", "FALSIFIERS")
# The evidence files the gates quote, relative to RUN_DIR.
TRAINING = RunDir.evidence_file(TRAINING_EVIDENCE)
PARITY = RunDir.evidence_file(PARITY_EVIDENCE)
RELEASE = RunDir.evidence_file(RELEASE_EVIDENCE)
UNKNOWN_LICENSE = "unknown"  # what `shipkit import` records when the upstream names none
IMPORTED = "imported model: not trained here"
# Per training-summary verdict: what it makes of the gate.
CONVERGENCE_STATUS = {"converging": DISCHARGED, "plateaued": DISCHARGED, "insufficient-epochs": PARTIAL,
                      "worsening": FAILED, "diverged": FAILED}
MEMORIZATION_STATUS = {"healthy": DISCHARGED, "overfitting": FAILED, "memorization-suspect": FAILED}
# Per verdict of a parity check group: what it makes of the gate.
VERDICT_STATUS = {PASS: DISCHARGED, FAIL: FAILED, SKIPPED: PARTIAL}
TRAIN_GATES = ("train.completed", "train.val_loss_decreasing", "train.convergence", "train.memorization",
               "train.wraps")


@dataclass
class Gate:
    id: str
    category: str
    status: str
    detail: str
    evidence: list[dict[str, Any]] = field(default_factory=list)  # {file, field, value}

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "status": self.status, "detail": self.detail,
                "evidence": self.evidence}


def ref(file: str, field_name: str, value: Any) -> dict[str, Any]:
    """One piece of evidence: `file` (relative to RUN_DIR), the field read, the value found."""
    return {"file": file, "field": field_name, "value": value}


# ---------------------------------------------------------------------------------------------
# What the gates read, loaded once


@dataclass
class Loaded:
    """A JSON file that may be absent (`data` None, `problem` None) or unusable (`problem`)."""

    data: dict[str, Any] | None
    problem: str | None = None


@dataclass
class RunView:
    run_dir: Path
    files: RunDir
    contract: Contract
    checkpoint: str  # relative to run_dir
    training: Loaded
    parity: Loaded
    release: Loaded
    metadata: dict[str, Any] | None  # the checkpoint's APR metadata, None when unreadable
    checkpoint_problem: str | None
    tensor_shapes: list[tuple[int, ...]]

    @property
    def source(self) -> dict[str, Any] | None:
        """`producer.source` of an imported checkpoint, else None."""
        source = ((self.metadata or {}).get("producer") or {}).get("source")
        return {"file": source} if isinstance(source, str) else source  # convert records a file name

    @property
    def config(self) -> ModelConfig | None:
        try:
            return ModelConfig.from_dict(self.metadata["config"]) if self.metadata else None
        except (KeyError, TypeError, ShipkitError):
            return None


def _load_evidence(run_dir: Path, name: str) -> Loaded:
    if not evidence_path(run_dir, name).is_file():
        return Loaded(None)
    try:
        return Loaded(read_evidence(run_dir, name))
    except ShipkitError as error:
        return Loaded(None, str(error))


def load_run(run_dir: Path, contract: Contract, checkpoint: str) -> RunView:
    metadata, problem, shapes = None, None, []
    path = run_dir / checkpoint
    if not path.is_file():
        problem = f"{checkpoint} not found (train into RUN_DIR, or `shipkit import` to RUN_DIR/{RunDir.BEST})"
    else:
        try:
            index = inspect_apr(path)
            metadata, shapes = index.metadata, [info.shape for info in index.tensors]
        except ShipkitError as error:
            problem = str(error)
    return RunView(run_dir, RunDir(run_dir), contract, checkpoint, _load_evidence(run_dir, TRAINING_EVIDENCE),
                   _load_evidence(run_dir, PARITY_EVIDENCE), _load_evidence(run_dir, RELEASE_EVIDENCE), metadata,
                   problem, shapes)


# ---------------------------------------------------------------------------------------------
# TRAIN


def train_gates(view: RunView) -> list[Gate]:
    thresholds = {m: t for m, t in view.contract.train.thresholds.items() if m != "wraps"}
    ids = [*TRAIN_GATES, *(f"train.{metric}" for metric in thresholds)]
    if view.training.data is None and view.training.problem is None and view.source is not None:
        upstream = ref(view.checkpoint, "producer.source.base_model", view.source.get("base_model"))
        return [Gate(gate_id, "TRAIN", PARTIAL, IMPORTED, [upstream]) for gate_id in ids]
    if view.training.data is None:
        detail = view.training.problem or f"{TRAINING} not found: run `shipkit train`"
        return [Gate(gate_id, "TRAIN", FAILED, detail) for gate_id in ids]
    training = view.training.data
    summary, epochs = training["summary"], training["epochs"]
    gates = [_completed(summary), _val_loss_decreasing(summary, epochs)]
    convergence = summary["convergence"]
    gates.append(Gate("train.convergence", "TRAIN", CONVERGENCE_STATUS[convergence],
                      f"last two val losses: {convergence}", [ref(TRAINING, "summary.convergence", convergence)]))
    gates.append(_training_regime(summary["memorization"], view))
    gates.append(_wraps(epochs, view.contract.train.thresholds.get("wraps")))
    for metric, threshold in thresholds.items():
        gates.append(_train_threshold(metric, threshold, training))
    return gates


def _training_regime(regime: dict[str, Any], view: RunView) -> Gate:
    """`healthy` passes; `overfitting` and `memorization-suspect` fail unless the released
    checkpoint is the best-val epoch from before a turn (then PARTIAL, saying so; a memorization
    signature has no turn: its best val loss is the artifact); the regimes that cannot judge yet
    (`too-early`, `split-shift`) are PARTIAL with their reason."""
    verdict = regime["verdict"]
    evidence = [ref(TRAINING, "summary.memorization.verdict", verdict),
                ref(TRAINING, "summary.memorization.best_epoch", regime.get("best_epoch"))]
    status = MEMORIZATION_STATUS.get(verdict, PARTIAL)
    detail = f"{verdict}: {regime['reason']}"
    if status == FAILED:
        released = ((view.metadata or {}).get("producer") or {}).get("epoch")
        turn = regime.get("turn_epoch")
        evidence.append(ref(view.checkpoint, "metadata.producer.epoch", released))
        if released is not None and released == regime.get("best_epoch") and turn is not None and released < turn:
            status = PARTIAL
            detail += f"; the released checkpoint is epoch {released}, the best val epoch before the turn"
    return Gate("train.memorization", "TRAIN", status, detail, evidence)


def _completed(summary: dict[str, Any]) -> Gate:
    evidence = [ref(TRAINING, "summary.stop_reason", summary["stop_reason"])]
    if summary["stop_reason"] == "completed":
        return Gate("train.completed", "TRAIN", DISCHARGED, "the run reached num_steps", evidence)
    if summary["stop_reason"] == "early_stop":  # patience ran out: a planned end, not a failure
        return Gate("train.completed", "TRAIN", DISCHARGED, f"stopped early: {summary['stop_message']}", evidence)
    if summary["status"] == "running":
        return Gate("train.completed", "TRAIN", PARTIAL, "the run has not finished (status running)", evidence)
    return Gate("train.completed", "TRAIN", FAILED, f"the run stopped: {summary['stop_message']}", evidence)


def _val_loss_decreasing(summary: dict[str, Any], epochs: list[dict[str, Any]]) -> Gate:
    if len(epochs) < 2:
        return Gate("train.val_loss_decreasing", "TRAIN", PARTIAL, f"{len(epochs)} epoch(s): nothing to compare",
                    [ref(TRAINING, "summary.epochs_completed", len(epochs))])
    first, best = epochs[0]["val_loss"], summary["best_val_loss"]
    evidence = [ref(TRAINING, "epochs[0].val_loss", first), ref(TRAINING, "summary.best_val_loss", best)]
    if best < first:
        return Gate("train.val_loss_decreasing", "TRAIN", DISCHARGED,
                    f"best val loss {best:.4f} < epoch 1's {first:.4f}", evidence)
    return Gate("train.val_loss_decreasing", "TRAIN", FAILED,
                f"val loss never fell below epoch 1's {first:.4f}", evidence)


def _wraps(epochs: list[dict[str, Any]], threshold: Threshold | None) -> Gate:
    if not epochs:
        return Gate("train.wraps", "TRAIN", PARTIAL, "no epoch recorded")
    wraps = epochs[-1]["wraps"]
    evidence = [ref(TRAINING, f"epochs[{len(epochs) - 1}].wraps", wraps)]
    if threshold is None:
        return Gate("train.wraps", "TRAIN", DISCHARGED, f"{wraps:.2f} passes over the train split, counted", evidence)
    return _threshold_gate("train.wraps", "TRAIN", wraps, threshold, evidence)


def _train_threshold(metric: str, threshold: Threshold, training: dict[str, Any]) -> Gate:
    summary = training["summary"]
    if metric == "best_val_loss_vs_uniform":
        best, vocab = summary["best_val_loss"], training["model"]["vocab_size"]
        value = None if best is None else best / math.log(vocab)
        evidence = [ref(TRAINING, "summary.best_val_loss", best), ref(TRAINING, "model.vocab_size", vocab)]
    else:
        value = summary[metric]
        evidence = [ref(TRAINING, f"summary.{metric}", value)]
    if value is None:
        return Gate(f"train.{metric}", "TRAIN", PARTIAL, "not measured yet (no epoch)", evidence)
    return _threshold_gate(f"train.{metric}", "TRAIN", value, threshold, evidence)


def _threshold_gate(gate_id: str, category: str, value: float, threshold: Threshold,
                    evidence: list[dict[str, Any]]) -> Gate:
    sign = "<=" if threshold.direction == "max" else ">="
    passes = threshold.passes(value)
    verb = "holds" if passes else "violated"
    detail = f"{value:.6g} {sign} {threshold.limit:g} {verb}: {threshold.reason}"
    return Gate(gate_id, category, DISCHARGED if passes else FAILED, detail, evidence)


# ---------------------------------------------------------------------------------------------
# CHECKPOINT


def checkpoint_gates(view: RunView) -> list[Gate]:
    ids = ("checkpoint.valid", "checkpoint.tensor_count", "checkpoint.sha256", "checkpoint.parameters",
           "checkpoint.architecture")
    if view.checkpoint_problem is not None:
        return [Gate(gate_id, "CHECKPOINT", FAILED, view.checkpoint_problem) for gate_id in ids]
    report = validate_apr(view.run_dir / view.checkpoint)
    valid = Gate("checkpoint.valid", "CHECKPOINT", DISCHARGED if report.ok else FAILED,
                 "every byte verified" if report.ok else "; ".join(report.problems[:3]),
                 [ref(view.checkpoint, "validate_apr.problems", len(report.problems))])
    return [valid, _tensor_count(view), _sha256(view), _parameters(view), _architecture(view)]


def _tensor_count(view: RunView) -> Gate:
    count, config = len(view.tensor_shapes), view.config
    if config is None:
        return Gate("checkpoint.tensor_count", "CHECKPOINT", FAILED,
                    "the checkpoint metadata holds no valid model config", [ref(view.checkpoint, "tensors", count)])
    expected = {"metadata.config": config.expected_tensor_count()}
    stated = view.contract.model.tensor_count
    if stated is not None:
        expected["contract model.tensor_count"] = stated.value
    evidence = [ref(view.checkpoint, "tensors", count),
                ref(view.checkpoint, "metadata.config (expected_tensor_count)", expected["metadata.config"])]
    wrong = {source: value for source, value in expected.items() if value != count}
    if wrong:
        detail = ", ".join(f"{source} expects {value}" for source, value in wrong.items())
        return Gate("checkpoint.tensor_count", "CHECKPOINT", FAILED, f"{count} tensors, but {detail}", evidence)
    return Gate("checkpoint.tensor_count", "CHECKPOINT", DISCHARGED,
                f"{count} tensors, as {' and '.join(expected)} expect", evidence)


def _sha256(view: RunView) -> Gate:
    """The checkpoint's bytes are the ones the evidence describes: the training summary's
    best_checkpoint, else (an import) the release manifest's checkpoint."""
    actual = sha256_file(view.run_dir / view.checkpoint)
    recorded = None
    training = view.training.data
    best = training["summary"]["best_checkpoint"] if training else None
    if best is not None and best["path"] == view.checkpoint:
        recorded = ref(TRAINING, "summary.best_checkpoint.sha256", best["sha256"])
    elif view.release.data is not None and view.release.data["checkpoint"]["path"] == view.checkpoint:
        recorded = ref(RELEASE, "checkpoint.sha256", view.release.data["checkpoint"]["sha256"])
    evidence = [ref(view.checkpoint, "sha256", actual)]
    if recorded is None:
        return Gate("checkpoint.sha256", "CHECKPOINT", PARTIAL, "no evidence file records this checkpoint's sha256",
                    evidence)
    evidence.append(recorded)
    if recorded["value"] != actual:
        return Gate("checkpoint.sha256", "CHECKPOINT", FAILED,
                    f"the file changed since {recorded['file']} was written", evidence)
    return Gate("checkpoint.sha256", "CHECKPOINT", DISCHARGED, f"equals {recorded['file']}", evidence)


def _parameters(view: RunView) -> Gate:
    parameters = sum(math.prod(shape) for shape in view.tensor_shapes)
    evidence = [ref(view.checkpoint, "tensors (sum of sizes)", parameters)]
    band = view.contract.model.parameters
    if band is None:
        return Gate("checkpoint.parameters", "CHECKPOINT", PARTIAL, "the contract sets no model.parameters band",
                    evidence)
    detail = f"{parameters:,} in [{band.minimum:,.0f}, {band.maximum:,.0f}]: {band.reason}"
    return Gate("checkpoint.parameters", "CHECKPOINT", DISCHARGED if band.holds(parameters) else FAILED,
                detail if band.holds(parameters) else f"not {detail}", evidence)


def _architecture(view: RunView) -> Gate:
    architecture = (view.metadata or {}).get("config", {}).get("architecture")
    evidence = [ref(view.checkpoint, "metadata.config.architecture", architecture)]
    allowed = view.contract.model.architectures
    if allowed is None:
        return Gate("checkpoint.architecture", "CHECKPOINT", PARTIAL, "the contract names no model.architectures",
                    evidence)
    ok = architecture in allowed.value
    return Gate("checkpoint.architecture", "CHECKPOINT", DISCHARGED if ok else FAILED,
                f"{architecture} {'in' if ok else 'not in'} {list(allowed.value)}: {allowed.reason}", evidence)


# ---------------------------------------------------------------------------------------------
# PARITY


def parity_gates(view: RunView) -> list[Gate]:
    parity = view.parity.data
    if parity is None:
        detail = view.parity.problem or f"{PARITY} not found: run `shipkit parity CKPT GGUF --run-dir RUN_DIR`"
        return [Gate("parity.evidence", "PARITY", FAILED, detail)]
    released = {path: sha256_file(path) for path in _gguf_files(view.files)}
    gates = [_parity_measured_release(view, parity, released), _parity_contract(view, parity)]
    for engine in parity["contract"]["required_engines"]:
        ran = engine in parity["engines"]
        gates.append(Gate(f"parity.engine.{engine}", "PARITY", DISCHARGED if ran else FAILED,
                          "ran" if ran else "required by the contract but not run",
                          [ref(PARITY, "contract.required_engines", parity["contract"]["required_engines"])]))
    for engine, section in sorted(parity["engines"].items()):
        for metric, check in sorted(section["checks"].items()):
            gates.append(_parity_check(f"parity.{engine}.{metric}", f"engines.{engine}.checks.{metric}", check))
    agreement = parity["agreement"]
    status = VERDICT_STATUS[agreement["verdict"]]
    gates.append(Gate("parity.agreement", "PARITY", status, agreement["side"] or agreement["note"],
                      [ref(PARITY, "agreement.verdict", agreement["verdict"]),
                       *(ref(PARITY, f"agreement.metrics.{m}", c["value"]) for m, c in agreement["checks"].items())]))
    tensors = parity["tensors"]
    worst = tensors["worst"][0] if tensors["worst"] else None
    gates.append(Gate("parity.tensors", "PARITY", DISCHARGED if tensors["verdict"] == PASS else FAILED,
                      "; ".join(entry["cause"] for entry in tensors["flagged"]) or "every tensor within rel_rmse",
                      [ref(PARITY, "tensors.worst[0]", worst)]))
    gates.append(_parity_tokenizer(parity["tokenizer"]))
    gates += _parity_file_gates(view, parity, released)
    imatrix = _imatrix_calibration(view, parity, released)
    return gates + ([imatrix] if imatrix is not None else [])


def _parity_tokenizer(tokenizer: dict[str, Any]) -> Gate:
    """llama.cpp reading the GGUF tokenizes the val text, adds BOS/EOS and renders the chat
    template as the HF tokenizer does."""
    status = VERDICT_STATUS[tokenizer["verdict"]]
    if tokenizer["verdict"] == SKIPPED:
        return Gate("parity.tokenizer", "PARITY", status, tokenizer["note"],
                    [ref(PARITY, "tokenizer.verdict", SKIPPED)])
    documents = tokenizer["documents"]
    detail = (f"{documents['documents_compared'] - documents['documents_differing']}/"
              f"{documents['documents_compared']} val documents tokenized alike "
              f"(pre-tokenizer {tokenizer['pre']!r}), BOS/EOS {tokenizer['special_tokens']['verdict']}, "
              f"chat template {tokenizer['chat_template']['verdict']}")
    first = documents["first_difference"]
    if first is not None:
        detail += f"; first difference in document {first['document']} at token {first['position']}: {first['text']!r}"
    chat = tokenizer["chat_template"]
    if chat["verdict"] == FAIL or chat.get("builtin_first_difference") is not None:
        detail += f"; chat template: {chat['note']}"
    return Gate("parity.tokenizer", "PARITY", status, detail,
                [ref(PARITY, "tokenizer.verdict", tokenizer["verdict"]),
                 ref(PARITY, "tokenizer.documents.documents_differing", documents["documents_differing"])])


def _parity_check(gate_id: str, field_name: str, check: dict[str, Any]) -> Gate:
    sign = "<=" if check["direction"] == "max" else ">="
    value = "n/a" if check["value"] is None else f"{check['value']:.6g}"
    return Gate(gate_id, "PARITY", DISCHARGED if check["verdict"] == PASS else FAILED,
                f"{value} {sign} {check['limit']:g}: {check['reason']}",
                [ref(PARITY, f"{field_name}.value", check["value"])])


def _parity_measured_release(view: RunView, parity: dict[str, Any], released: dict[Path, str]) -> Gate:
    """Parity measured this checkpoint and one of the released GGUF files, not other bytes."""
    evidence = [ref(PARITY, "base.sha256", parity["base"]["sha256"]),
                ref(PARITY, "quant.sha256", parity["quant"]["sha256"])]
    problems = []
    if view.checkpoint_problem is None and sha256_file(view.run_dir / view.checkpoint) != parity["base"]["sha256"]:
        problems.append(f"its base is not {view.checkpoint}")
    if released and parity["quant"]["sha256"] not in released.values():
        problems.append(f"its GGUF is none of {RunDir.RELEASE_GGUF}/*.gguf")
    if problems:
        return Gate("parity.measured_release", "PARITY", FAILED, "; ".join(problems) + ": re-run `shipkit parity`",
                    evidence)
    if not released:
        return Gate("parity.measured_release", "PARITY", PARTIAL,
                    f"the checkpoint matches; {RunDir.RELEASE_GGUF} holds no GGUF yet", evidence)
    return Gate("parity.measured_release", "PARITY", DISCHARGED, "the checkpoint and a released GGUF", evidence)


def _parity_file_gates(view: RunView, parity: dict[str, Any], released: dict[Path, str]) -> list[Gate]:
    """`parity.file.<name>`: one line per file of a run over several files, FAILED when the file
    failed under its band; and every released GGUF must have been measured, so a released model
    file parity did not score is a FAILED line of its own (a released imatrix is not a model)."""
    gates = {}
    for index, entry in enumerate(parity.get("files", [])):
        gates[entry["name"]] = _parity_file(index, entry)
    measured = {parity["quant"]["sha256"], *(entry["sha256"] for entry in parity.get("files", []))}
    for path, sha256 in released.items():
        if sha256 in measured or _is_imatrix(path):
            continue
        relative = view.files.relative(path)
        gates[path.name] = Gate(f"parity.file.{path.name}", "PARITY", FAILED,
                                f"{relative} is released but parity did not measure these bytes: run `shipkit "
                                f"parity CKPT {RunDir.RELEASE_GGUF}/*.gguf --run-dir RUN_DIR`",
                                [ref(relative, "sha256", sha256)])
    return list(gates.values())


def _parity_file(index: int, entry: dict[str, Any]) -> Gate:
    metrics, field_name = entry["metrics"] or {}, f"files[{index}]"

    def shown(metric: str, fmt: str) -> str:
        value = metrics.get(metric)
        return "n/a" if value is None else format(value, fmt)

    detail = (f"{entry['file_type']}, {entry['bits_per_weight']:.2f} bpw, imatrix {'yes' if entry['imatrix'] else 'no'}: "
              f"KL mean {shown('kl_mean', '.3g')}, same-top {shown('same_top_pct', '.2f')}%, PPL ratio "
              f"{shown('ppl_ratio', '.5f')} under band {entry['band']['name']}")
    if entry["failed"]:
        detail += f"; failed {', '.join(entry['failed'])}"
    return Gate(f"parity.file.{entry['name']}", "PARITY", DISCHARGED if entry["verdict"] == PASS else FAILED, detail,
                [ref(PARITY, f"{field_name}.verdict", entry["verdict"]), ref(PARITY, f"{field_name}.sha256", entry["sha256"])])


def _is_imatrix(path: Path) -> bool:
    """Whether a .gguf holds an importance matrix (general.type "imatrix"), not a model."""
    from shipkit.imatrix.format import IMATRIX_TYPE
    from shipkit.quantize.gguf_load import open_gguf

    try:
        field = open_gguf(path).fields.get("general.type")
    except ShipkitError:
        return False  # not readable: the release gates report it; here it stays an unmeasured model
    return field is not None and field.contents() == IMATRIX_TYPE


def _made_with(record: dict[str, Any], matrix: Any) -> bool:
    """Whether a GGUF's llama-quantize keys describe `matrix`: the same entry count, and its dataset
    name (which llama-quantize cuts to 127 bytes) the start of the matrix's first."""
    dataset = matrix.datasets[0] if matrix.datasets else None
    same_dataset = (record["dataset"] is None and dataset is None) or (
        record["dataset"] is not None and dataset is not None and dataset.encode().startswith(record["dataset"].encode()))
    return same_dataset and record["entries"] in (None, len(matrix.importance))


def _imatrix_calibration(view: RunView, parity: dict[str, Any], released: dict[Path, str]) -> Gate | None:
    """`quantize.imatrix_calibration`: an imatrix behind a released GGUF was computed off the val
    split the parity gate scores. Read from each GGUF's llama-quantize keys (its dataset names the
    calibration split by hash) and from the imatrix file released beside it (its calibration
    record); absent when no released file was made with an imatrix."""
    from shipkit.imatrix import load_imatrix
    from shipkit.imatrix.format import split_sha256
    from shipkit.parity.gguf_facts import dataset_split, imatrix_keys
    from shipkit.quantize.gguf_load import open_gguf
    from shipkit.tokenize import read_manifest

    used = {}
    for path in released:
        try:
            record = imatrix_keys(open_gguf(path))
        except ShipkitError:
            continue  # an unreadable GGUF fails its release gate
        if record is not None:
            used[path] = record
    if not used:
        return None
    gate_id, tokens_dir = "quantize.imatrix_calibration", Path(parity["tokens"]["tokens_dir"])
    evidence = [ref(view.files.relative(path), "quantize.imatrix.dataset", record["dataset"])
                for path, record in used.items()]
    try:
        val_sha256 = split_sha256(read_manifest(tokens_dir), "val")
    except ShipkitError as error:
        return Gate(gate_id, "PARITY", PARTIAL, f"the val split parity scored cannot be read: {error}", evidence)
    failures, unconfirmed = [], []
    for path, record in used.items():
        relative, split = view.files.relative(path), dataset_split(record["dataset"])
        if split is not None and (split[0] != "train" or split[1] == val_sha256):
            failures.append(f"{relative}: its imatrix dataset {record['dataset']!r} is not the train split")
            continue
        beside = path.parent / record["file"] if record["file"] else None
        if beside is None or not beside.is_file():
            (unconfirmed if split is not None else failures).append(
                f"{relative}: its imatrix {record['file']!r} is not released beside it"
                + ("" if split is not None else ", and its dataset does not name a split"))
            continue
        try:
            matrix = load_imatrix(beside)
            matrix.check_not_val(tokens_dir)
        except ShipkitError as error:
            failures.append(str(error))
            continue
        if not _made_with(record, matrix):
            failures.append(f"{relative}: {view.files.relative(beside)} is not the imatrix it was made with "
                            f"(dataset or entry count differs)")
    if failures:
        return Gate(gate_id, "PARITY", FAILED, "; ".join(failures), evidence)
    if unconfirmed:
        return Gate(gate_id, "PARITY", PARTIAL, "the datasets name the train split, but " + "; ".join(unconfirmed),
                    evidence)
    return Gate(gate_id, "PARITY", DISCHARGED,
                f"{len(used)} released file(s) made with an imatrix computed on the train split, not the val split "
                f"parity scored (sha256 {val_sha256[:12]}…)", evidence)


def _parity_contract(view: RunView, parity: dict[str, Any]) -> Gate:
    measured_under = parity["contract"]["name"]
    evidence = [ref(PARITY, "contract.name", measured_under)]
    if measured_under != view.contract.name:
        return Gate("parity.contract", "PARITY", FAILED,
                    f"parity ran under contract {measured_under!r}, the gates under {view.contract.name!r}: "
                    "re-run `shipkit parity --contract`", evidence)
    return Gate("parity.contract", "PARITY", DISCHARGED, f"measured under contract {measured_under!r}", evidence)


# ---------------------------------------------------------------------------------------------
# CARD


def _card_data(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The card's front matter as a dict (parsed with huggingface_hub), or the reason it is not."""
    from huggingface_hub import ModelCard

    if not path.is_file():
        return None, "not found: run `shipkit card RUN_DIR`"
    try:
        return ModelCard.load(path).data.to_dict(), None
    except (ValueError, OSError) as error:
        return None, f"does not parse as a model card ({error})"


def card_gates(view: RunView) -> list[Gate]:
    data, problem = _card_data(view.files.card)
    ids = ("card.exists", "card.fields", "card.numbers", "card.evidence_current")
    if data is None:
        return [Gate(gate_id, "CARD", FAILED, f"{RunDir.CARD}: {problem}") for gate_id in ids]
    gates = [Gate("card.exists", "CARD", DISCHARGED, "parses with huggingface_hub ModelCard",
                  [ref(RunDir.CARD, "front matter keys", sorted(data))])]
    required = view.contract.card.required_fields
    if required is None:
        gates.append(Gate("card.fields", "CARD", PARTIAL, "the contract names no card.required_fields"))
    else:
        missing = [key for key in required.value if data.get(key) in (None, "", [])]
        gates.append(Gate("card.fields", "CARD", FAILED if missing else DISCHARGED,
                          f"missing {missing}" if missing else f"all of {list(required.value)}: {required.reason}",
                          [ref(RunDir.CARD, key, data.get(key)) for key in required.value]))
    gates.append(_card_numbers(view, data))
    gates.append(_card_evidence_current(view))
    return gates


def _card_numbers(view: RunView, data: dict[str, Any]) -> Gate:
    """The card's model-index equals the evidence: the best val loss (a trained model) and each
    engine's parity metrics on the GGUF card."""
    mismatches, evidence = [], []
    training = view.training.data
    if training is not None and training["summary"]["best_val_loss"] is not None:
        best = training["summary"]["best_val_loss"]
        stated = _metric_values(data).get("loss")
        evidence += [ref(TRAINING, "summary.best_val_loss", best), ref(RunDir.CARD, "model-index loss", stated)]
        text = view.files.card.read_text(encoding="utf-8")
        if stated != [best] or f"{best:.4f}" not in text:
            mismatches.append(f"the card does not state best val loss {best!r}")
    gguf_data, _ = _card_data(view.files.gguf_card)
    if view.parity.data is not None and gguf_data is not None:
        stated = _metric_values(gguf_data).get("kl_mean", [])
        measured = [section["metrics"]["kl_mean"] for _, section in sorted(view.parity.data["engines"].items())]
        evidence += [ref(PARITY, "engines.*.metrics.kl_mean", measured),
                     ref(RunDir.GGUF_CARD, "model-index kl_mean", stated)]
        if sorted(stated) != sorted(value for value in measured if value is not None):
            mismatches.append("the GGUF card's kl_mean differs from the parity evidence")
    if mismatches:
        return Gate("card.numbers", "CARD", FAILED, "; ".join(mismatches) + ": re-run `shipkit card`", evidence)
    if not evidence:
        return Gate("card.numbers", "CARD", PARTIAL, "no measured number to compare (no trained epoch, no GGUF card)")
    return Gate("card.numbers", "CARD", DISCHARGED, "the card's numbers equal the evidence", evidence)


def _metric_values(data: dict[str, Any]) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for entry in data.get("model-index") or []:
        for result in entry.get("results", []):
            for metric in result.get("metrics", []):
                values.setdefault(metric["type"], []).append(metric["value"])
    return values


def _card_evidence_current(view: RunView) -> Gate:
    """The card was rendered from the evidence now on disk (release.json records its sha256)."""
    if view.release.data is None:
        return Gate("card.evidence_current", "CARD", FAILED,
                    view.release.problem or f"{RELEASE} not found: run `shipkit card`")
    evidence, stale = [], []
    for name, recorded in sorted(view.release.data["evidence"].items()):
        path = view.files.evidence(name)
        current = sha256_file(path) if path.is_file() else None
        evidence.append(ref(RELEASE, f"evidence.{name}", recorded))
        if current != recorded:
            stale.append(name)
    if stale:
        return Gate("card.evidence_current", "CARD", FAILED,
                    f"{', '.join(stale)} changed since the card was rendered: re-run `shipkit card`", evidence)
    return Gate("card.evidence_current", "CARD", DISCHARGED, "rendered from the evidence on disk", evidence)


# ---------------------------------------------------------------------------------------------
# RELEASE


def release_gates(view: RunView) -> list[Gate]:
    gates = [_license(view)]
    quants = view.contract.release.quants
    for name in quants.value if quants else ():
        gates.append(_gguf_gate(view, name, quants.reason))
    gates.append(_hf_folder(view))
    return gates


def _license(view: RunView) -> Gate:
    data, problem = _card_data(view.files.card)
    if data is None:
        return Gate("release.license", "RELEASE", FAILED, f"{RunDir.CARD}: {problem}")
    license_id = data.get("license")
    evidence = [ref(RunDir.CARD, "license", license_id)]
    upstream = (view.source or {}).get("license")
    if upstream is not None:
        evidence.append(ref(view.checkpoint, "producer.source.license", upstream))
    allowed = view.contract.release.licenses
    if not license_id or license_id == UNKNOWN_LICENSE:
        return Gate("release.license", "RELEASE", FAILED, "no license: pass `shipkit card --license ID`", evidence)
    if upstream not in (None, UNKNOWN_LICENSE) and upstream != license_id:
        return Gate("release.license", "RELEASE", FAILED,
                    f"the upstream model is {upstream}, the card says {license_id}", evidence)
    if allowed is not None and license_id not in allowed.value:
        return Gate("release.license", "RELEASE", FAILED,
                    f"{license_id} not in {list(allowed.value)}: {allowed.reason}", evidence)
    return Gate("release.license", "RELEASE", DISCHARGED, f"{license_id}", evidence)


def _gguf_files(files: RunDir) -> list[Path]:
    folder = files.release_gguf
    return sorted(folder.glob("*.gguf")) if folder.is_dir() else []


def _gguf_gate(view: RunView, file_type: str, reason: str) -> Gate:
    """A GGUF in release/gguf whose header parses and declares `file_type` and the checkpoint's
    architecture."""
    from shipkit.quantize import mix
    from shipkit.quantize.gguf_load import open_gguf
    from shipkit.quantize.tensor_names import GGUF_ARCHITECTURES

    gate_id = f"release.gguf.{file_type}"
    wanted = int(mix.file_type(file_type).ftype)
    architecture = (view.metadata or {}).get("config", {}).get("architecture")
    architecture = GGUF_ARCHITECTURES.get(architecture, architecture)  # mistral runs as llama
    seen = []
    for path in _gguf_files(view.files):
        relative = view.files.relative(path)
        try:
            reader = open_gguf(path)
            found_type = int(reader.fields["general.file_type"].contents())
            found_arch = reader.fields["general.architecture"].contents()
        except (ShipkitError, LookupError, TypeError, ValueError) as error:  # a lying header, a missing or mistyped key
            seen.append(f"{relative}: header does not parse ({error})")
            continue
        evidence = [ref(relative, "general.file_type", found_type), ref(relative, "general.architecture", found_arch)]
        if found_type == wanted and found_arch == architecture:
            return Gate(gate_id, "RELEASE", DISCHARGED, f"{relative}: {reason}", evidence)
        seen.append(f"{relative}: file_type {found_type}, {found_arch}")
    found = "; ".join(seen) or f"{RunDir.RELEASE_GGUF} holds no .gguf"
    return Gate(gate_id, "RELEASE", FAILED,
                f"no {file_type} GGUF (file_type {wanted}) of a {architecture} model: {found}; "
                f"run `shipkit quantize CKPT --q4k --out {RunDir.RELEASE_GGUF}/`", [])


def _hf_folder(view: RunView) -> Gate:
    """release/hf holds the files transformers needs, config.json names the checkpoint's
    architecture, and the safetensors hold as many tensors as the checkpoint."""
    from safetensors import safe_open

    folder = view.files.release_hf
    required = view.contract.release.hf_files
    names = required.value if required else ()
    missing = [name for name in names if not (folder / name).is_file()]
    weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not weights:
        missing.append("*.safetensors")
    if missing:
        return Gate("release.hf", "RELEASE", FAILED,
                    f"{RunDir.RELEASE_HF} lacks {missing}: run `shipkit export CKPT --hf {RunDir.RELEASE_HF}`")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tensors = 0
        for path in weights:
            with safe_open(str(path), framework="pt") as handle:
                tensors += len(list(handle.keys()))
    except (OSError, ValueError, json.JSONDecodeError) as error:
        return Gate("release.hf", "RELEASE", FAILED, f"{RunDir.RELEASE_HF} does not load: {error}")
    evidence = [ref(f"{RunDir.RELEASE_HF}/config.json", "model_type", config.get("model_type")),
                ref(f"{RunDir.RELEASE_HF}/*.safetensors", "tensors", tensors)]
    architecture = (view.metadata or {}).get("config", {}).get("architecture")
    problems = []
    if config.get("model_type") != architecture:
        problems.append(f"config.json model_type {config.get('model_type')!r}, checkpoint {architecture!r}")
    if view.tensor_shapes and tensors != len(view.tensor_shapes):
        problems.append(f"{tensors} safetensors tensors, checkpoint {len(view.tensor_shapes)}")
    if problems:
        return Gate("release.hf", "RELEASE", FAILED, "; ".join(problems) + ": re-run `shipkit export`", evidence)
    return Gate("release.hf", "RELEASE", DISCHARGED,
                f"{len(weights)} safetensors file(s) and {', '.join(names) or 'no other required file'}", evidence)


# ---------------------------------------------------------------------------------------------
# FALSIFIERS


def falsifier_gates(view: RunView) -> list[Gate]:
    training = view.training.data
    if training is None:
        detail = IMPORTED if view.source is not None else "no training summary, so no recorded prediction"
        return [Gate("falsifiers.predictions", "FALSIFIERS", PARTIAL, detail)]
    predictions = training.get("predictions", [])
    if not predictions:
        return [Gate("falsifiers.predictions", "FALSIFIERS", PARTIAL,
                     "no prediction was recorded before training (`shipkit train --predict EXPR`)")]
    gates = []
    for index, prediction in enumerate(predictions):
        verdict = prediction["verdict"]
        status = {CONFIRMED: DISCHARGED, FALSIFIED: FAILED}.get(verdict, PARTIAL)
        detail = (f"{prediction['expr']} (recorded {prediction['recorded_at']}): {verdict}, "
                  f"observed {prediction['observed']}")
        gates.append(Gate(f"falsifiers.prediction.{index + 1}", "FALSIFIERS", status, detail,
                          [ref(TRAINING, f"predictions[{index}].verdict", verdict),
                           ref(TRAINING, f"summary.{prediction['field']}", prediction["observed"])]))
    return gates


# ---------------------------------------------------------------------------------------------
# The scoreboard

GATE_GROUPS: tuple[Callable[[RunView], list[Gate]], ...] = (
    train_gates, checkpoint_gates, parity_gates, card_gates, release_gates, falsifier_gates,
)


def evaluate_gates(run_dir: str | Path, *, contract: str | Path | None = None,
                   checkpoint: str = RunDir.BEST) -> dict[str, Any]:
    """Every gate of `run_dir` under `contract` (the default contract when None); returns the
    gates evidence (schema `gates`) without writing it. Raises InputError for a missing RUN_DIR
    or a bad contract; a failed gate is a FAILED entry, never an exception."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder (give the RUN_DIR of `shipkit train` or `shipkit import`)")
    # An absolute path in `contract.source` lets `shipkit push` re-evaluate from any folder.
    loaded = load_contract(None if contract is None else Path(contract).resolve())
    view = load_run(run_dir, loaded, checkpoint)
    gates = [gate for group in GATE_GROUPS for gate in group(view)]
    counts = {status: sum(gate.status == status for gate in gates) for status in GATE_STATUSES}
    return {
        "schema_version": SCHEMA_VERSION,
        "verdict": FAIL if counts[FAILED] else PASS,
        "summary": summary_line(counts),
        "counts": counts,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shipkit_version": __version__,
        "host": platform.node(),
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "imported": view.source is not None,
        "contract": {"name": loaded.name, "source": loaded.source},
        "gates": [gate.to_dict() for gate in gates],
    }


def run_gates(run_dir: str | Path, *, contract: str | Path | None = None,
              checkpoint: str = RunDir.BEST) -> dict[str, Any]:
    """`evaluate_gates`, written to `RUN_DIR/evidence/gates.json`; returns the evidence."""
    result = evaluate_gates(run_dir, contract=contract, checkpoint=checkpoint)
    write_evidence(run_dir, GATES_EVIDENCE, result)
    return result


# ---------------------------------------------------------------------------------------------
# A recorded scoreboard against one evaluated now (`shipkit push`)

# Fields of the record that follow from its gates: named as changed only when the gates agree.
DERIVED_FIELDS = ("verdict", "summary", "counts")
# Fields that must agree too. Left out: `date`, `host`, `shipkit_version`, `run_dir` (how RUN_DIR
# was spelled) and each gate's `detail`, prose made from its evidence that may quote RUN_DIR.
RECORD_FIELDS = ("checkpoint", "imported")
GATE_FIELDS = ("category", "status", "evidence")


def recorded_contract(scoreboard: dict[str, Any]) -> Path | None:
    """The contract file a scoreboard was evaluated under, None for the packaged default: read
    back from `contract.source`, which `load_contract` writes as `PATH (over DEFAULT)`."""
    source, default = scoreboard["contract"]["source"], load_contract(None).source
    if source == default:
        return None
    path, over, rest = source.rpartition(" (over ")
    if not over or rest != f"{default})":
        raise IntegrityError(f"{RunDir.evidence_file(GATES_EVIDENCE)}: contract.source {source!r} names no contract "
                             "file; re-run `shipkit gates`")
    return Path(path)


def scoreboard_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How the scoreboard evaluated now differs from the recorded one, a phrase per changed gate
    or field; empty when they agree."""
    before = {gate["id"]: gate for gate in recorded["gates"]}
    now = {gate["id"]: gate for gate in current["gates"]}
    changes = [f"gate {gate_id} {change}" for gate_id in [*now, *(i for i in before if i not in now)]
               if (change := _gate_change(before.get(gate_id), now.get(gate_id)))]
    if not changes and [gate["id"] for gate in recorded["gates"]] != [gate["id"] for gate in current["gates"]]:
        changes.append("the recorded gates repeat or reorder gates")
    fields = [*RECORD_FIELDS, *(() if changes else DERIVED_FIELDS)]
    changes += [f"{name} {_canonical(recorded[name])} recorded, {_canonical(current[name])} now"
                for name in fields if _canonical(recorded[name]) != _canonical(current[name])]
    if recorded["contract"]["name"] != current["contract"]["name"]:
        changes.append(f"contract {recorded['contract']['name']!r} recorded, {current['contract']['name']!r} now")
    return changes


def _gate_change(before: dict[str, Any] | None, now: dict[str, Any] | None) -> str | None:
    if before is None:
        return f"{now['status']} now, absent from the record"
    if now is None:
        return f"{before['status']} in the record, no longer evaluated"
    if before["status"] != now["status"]:
        return f"{before['status']} recorded, {now['status']} now ({' '.join(now['detail'].split())})"
    if any(_canonical(before[name]) != _canonical(now[name]) for name in GATE_FIELDS):
        return f"{now['status']} in both, but its evidence or category changed"
    return None


def _canonical(value: Any) -> str:
    """JSON text, so a value compares equal to itself read back from evidence (tuples, NaN)."""
    return json.dumps(value, sort_keys=True)


def summary_line(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return f"{counts[DISCHARGED]}/{total} DISCHARGED, {counts[PARTIAL]} PARTIAL, {counts[FAILED]} FAILED"


def render_scoreboard(result: dict[str, Any]) -> str:
    """The gates as a table (category, gate, status, evidence) and the summary line."""
    rows = [("CATEGORY", "GATE", "STATUS", "EVIDENCE")]
    for gate in result["gates"]:
        rows.append((gate["category"], gate["id"], gate["status"], _evidence_text(gate["evidence"]) or "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}" for row in rows]
    failing = [gate for gate in result["gates"] if gate["status"] != DISCHARGED]
    if failing:
        lines.append("")
        lines += [f"{gate['status']} {gate['id']}: {gate['detail']}" for gate in failing]
    lines += ["", f"contract {result['contract']['name']} ({result['contract']['source']})", result["summary"]]
    return "\n".join(lines)


def _evidence_text(evidence: list[dict[str, Any]]) -> str:
    """`file: field=value, field=value; file: ...` with each file named once."""
    by_file: dict[str, list[str]] = {}
    for item in evidence:
        by_file.setdefault(item["file"], []).append(f"{item['field']}={_short(item['value'])}")
    return "; ".join(f"{file.removeprefix(f'{RunDir.EVIDENCE}/')}: {', '.join(fields)}"
                     for file, fields in by_file.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    if isinstance(value, list):
        text = "[" + ", ".join(_short(item) for item in value) + "]"
    else:
        text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 48 else text[:47] + "…"
