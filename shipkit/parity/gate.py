"""The gate: what the engines measured, judged against the contract, as parity.json — per
engine the summary and its checks, the engine agreement, the worst and flagged tensors, the
tokenizer section, and the run's verdict with what failed and why. A run over several files adds
a section per file, each judged under its file type's band. Field by field: docs/parity.md."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from shipkit import __version__
from shipkit.config import parameter_count
from shipkit.contract import AppliedBand, Contract, Threshold
from shipkit.evidence import FAIL, PASS, SKIPPED
from shipkit.fsutil import sha256_file
from shipkit.parity.diagnosis import diagnose_tensor
from shipkit.parity.gguf_facts import GgufFacts
from shipkit.parity.inputs import Windows
from shipkit.parity.metrics import (
    EngineResult,
    PositionStats,
    agreement_metrics,
    check,
    finite,
    summarize,
)
from shipkit.parity.options import TORCH, ParityOptions
from shipkit.parity.weights import LoadedModel

SCHEMA_VERSION = 1
NO_LAYERS_NOTE = "this llama.cpp build named no l_out-N tensors, so no per-layer cosine"


@dataclass
class FileMeasured:
    """What the engines measured for one quantized file."""

    engines: dict[str, EngineResult]
    tensor_errors: dict[str, float]


@dataclass
class Measured:
    """What a run measured, for the gate to judge: per file (the primary first) and, once for
    the run, the engine agreement on the base model."""

    files: list[FileMeasured]
    agreement: PositionStats | None
    agreement_model: str | None  # what llama.cpp ran as the base
    agreement_side: str | None


@dataclass
class Judged:
    """One file's measurements under its band: the sections and what failed."""

    band: AppliedBand
    engines: dict[str, dict[str, Any]]
    tensors: dict[str, Any]
    tokenizer: dict[str, Any]  # the file's tokenizer verdict and note
    failed: list[str]
    causes: list[str]

    @property
    def verdict(self) -> str:
        return FAIL if self.failed else PASS


def parity_evidence(options: ParityOptions, contract: Contract, base: LoadedModel, quants: list[LoadedModel],
                    facts: list[GgufFacts], windows: Windows, measured: Measured,
                    tokenizer: dict[str, Any]) -> dict[str, Any]:
    """parity.json's content: each file's measurements under `contract`'s thresholds for its file
    type and the base model's size band, the verdict "PASS" or "FAIL", the failed checks and
    their likely causes. With one file the document describes it; with several, the top level
    still describes the primary (the first), the verdict and failures cover every file, and
    `files` holds a section per file."""
    parameters = parameter_count(base.config)
    agreement = _agreement_section(measured, contract)
    run = _Run(contract, parameters, base, windows, agreement, tokenizer, facts[0])
    judged = [_judge(run, index, quant, file_facts, file_measured)
              for index, (quant, file_facts, file_measured) in enumerate(zip(quants, facts, measured.files))]
    primary, primary_facts = judged[0], facts[0]
    evidence = {
        "schema_version": SCHEMA_VERSION,
        "verdict": primary.verdict,
        "failed": primary.failed,
        "causes": primary.causes,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shipkit_version": __version__,
        "host": platform.node(),
        "base": {"path": str(base.path), "format": base.format, "sha256": sha256_file(base.path)},
        "quant": {"path": str(primary_facts.path), "sha256": primary_facts.sha256, "bytes": primary_facts.nbytes,
                  "tensor_types": primary_facts.tensor_types},
        "model": base.config.to_dict(),
        "parameters": parameters,
        "tokens": {
            "tokens_dir": str(options.tokens_dir),
            "split": "val",
            "tokenizer_sha256": windows.tokenizer_sha256,
            "ctx": windows.ctx,
            "windows": len(windows.tokens),
            "tokens_evaluated": int(windows.tokens.size),
            "positions_scored": len(windows.tokens) * windows.positions_per_window,
        },
        "contract": {
            "name": contract.name,
            "source": contract.source,
            "reference": contract.parity.reference,
            "band": primary.band.size_band,
            "band_reason": _band_reason(contract, primary.band.size_band),
            "required_engines": list(contract.parity.required_engines),
        },
        "engines": primary.engines,
        "agreement": agreement,
        "tensors": primary.tensors,
        "tokenizer": tokenizer,
    }
    if len(quants) > 1:
        sections = [_file_section(file_facts, index == 0, file_judged)
                    for index, (file_facts, file_judged) in enumerate(zip(facts, judged))]
        evidence["verdict"] = FAIL if any(section["verdict"] == FAIL for section in sections) else PASS
        evidence["failed"] = [f"{section['name']}: {failure}" for section in sections for failure in section["failed"]]
        evidence["causes"] = [f"{section['name']}: {cause}" for section in sections for cause in section["causes"]]
        evidence["files"] = sections
    return evidence


@dataclass
class _Run:
    """What every file of a run is judged with."""

    contract: Contract
    parameters: int
    base: LoadedModel
    windows: Windows
    agreement: dict[str, Any]  # the agreement section
    tokenizer: dict[str, Any]  # the tokenizer check of the primary file
    primary: GgufFacts


def _judge(run: _Run, index: int, quant: LoadedModel, facts: GgufFacts, measured: FileMeasured) -> Judged:
    """File `index` of the run judged under its band: the primary (index 0) against the
    contract's required engines and the tokenizer check, any other against `every_file_engines`
    and the primary's tokenizer keys; every file against the engine agreement, which concerns the
    runtimes and the base model they all share."""
    parity = run.contract.parity
    band = parity.band_for(run.parameters, facts.file_type)
    failures: list[str] = []
    causes: list[str] = []
    engines = {}
    for name, result in measured.engines.items():
        engines[name] = _engine_section(result, run.windows, band.thresholds)
        failures += [f"{name}.{metric}" for metric, c in engines[name]["checks"].items() if c["verdict"] == FAIL]
    for engine in parity.required_engines if index == 0 else parity.every_file_engines:
        if engine not in measured.engines:
            failures.append(f"{engine}: required by the contract but not run")
    if run.agreement["verdict"] == FAIL:
        failures += [f"agreement.{m}" for m, c in run.agreement["checks"].items() if c["verdict"] == FAIL]
        causes.append(run.agreement["side"] or "conversion: the two runtimes disagree on the base model")
    tensors = _tensor_section(measured.tensor_errors, band.tensors, run.base, quant)
    if tensors["verdict"] == FAIL:
        failures.append("tensors.rel_rmse")
        causes += [entry["cause"] for entry in tensors["flagged"]]
    file_tokenizer, keys_differ = _file_tokenizer(index, facts, run.primary, run.tokenizer)
    if keys_differ:
        failures.append("tokenizer.keys")
        causes.append(f"tokenizer: {file_tokenizer['note']}")
    elif file_tokenizer["verdict"] == FAIL:
        failures += [f"tokenizer.{part}" for part in run.tokenizer["failed"]]
        causes.append(_tokenizer_cause(run.tokenizer))
    return Judged(band, engines, tensors, file_tokenizer, failures, causes)


def _file_tokenizer(index: int, facts: GgufFacts, primary_facts: GgufFacts,
                    tokenizer: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A file's tokenizer verdict and note, and whether its tokenizer keys differ from the
    primary's: the tokenizer check read the primary file, and another file shares its verdict
    when it stores the same tokenizer keys, and fails when it does not."""
    primary = primary_facts.path.name
    if index == 0:
        note = tokenizer["note"] if tokenizer["verdict"] == SKIPPED else "the tokenizer check read this file"
        return {"verdict": tokenizer["verdict"], "note": note}, False
    differing = facts.tokenizer_difference(primary_facts)
    if differing is not None:
        return {"verdict": FAIL, "note": f"its {differing} differs from {primary}'s, the file the tokenizer check read"}, True
    return {"verdict": tokenizer["verdict"], "note": f"the same tokenizer keys as {primary}, whose check this is"}, False


def _file_section(facts: GgufFacts, primary: bool, judged: Judged) -> dict[str, Any]:
    torch_engine = judged.engines.get(TORCH)
    return {
        "name": facts.path.name,
        "path": str(facts.path),
        "sha256": facts.sha256,
        "bytes": facts.nbytes,
        "primary": primary,
        "file_type": facts.file_type,
        "file_type_id": facts.file_type_id,
        "tensor_types": facts.tensor_types,
        "tensor_bytes": facts.tensor_bytes,
        "weights": facts.weights,
        "bits_per_weight": facts.bits_per_weight,
        "imatrix": facts.imatrix,
        "band": judged.band.to_dict(),
        "metrics": torch_engine["metrics"] if torch_engine else None,
        "engines": judged.engines,
        "tensors": judged.tensors,
        "tokenizer": judged.tokenizer,
        "verdict": judged.verdict,
        "failed": judged.failed,
        "causes": judged.causes,
    }


def _tokenizer_cause(tokenizer: dict[str, Any]) -> str:
    first = tokenizer["documents"]["first_difference"]
    if first is not None:
        return (f"tokenizer: llama.cpp tokenizes {tokenizer['documents']['documents_differing']} val "
                f"document(s) differently from the HF tokenizer (the GGUF's pre-tokenizer "
                f"{tokenizer['gguf_pre']!r}, the tokenizer's {tokenizer['pre']!r}); "
                f"first at document {first['document']}, token {first['position']}: {first['text']!r}")
    if "special_tokens" in tokenizer["failed"]:
        return "tokenizer: llama.cpp adds BOS/EOS differently from the HF tokenizer"
    return f"tokenizer: chat template: {tokenizer['chat_template'].get('note')}"


def _band_reason(contract: Contract, band: str) -> str:
    for size_band in contract.parity.size_bands:
        if size_band.name == band:
            return size_band.reason
    return contract.parity.reference


def _engine_section(result: EngineResult, windows: Windows, thresholds: dict[str, Threshold]) -> dict[str, Any]:
    metrics = summarize(PositionStats.concat(result.parts))
    cosines = result.hidden_cosine()
    metrics["hidden_cosine_min"] = min(cosines) if cosines and None not in cosines else None
    checks = {name: check(metrics[name], threshold) for name, threshold in thresholds.items()}
    return {
        "device": result.device,
        "seconds": result.seconds,
        "tokens_per_second": windows.tokens.size / result.seconds if result.seconds > 0 else None,
        "metrics": metrics,
        "hidden_cosine": cosines,
        "hidden_cosine_note": None if cosines is not None else NO_LAYERS_NOTE,
        "checks": checks,
        "verdict": FAIL if any(c["verdict"] == FAIL for c in checks.values()) else PASS,
    }


def _agreement_section(measured: Measured, contract: Contract) -> dict[str, Any]:
    if measured.agreement is None:
        return {"verdict": SKIPPED, "model": None, "metrics": None, "checks": {}, "side": None,
                "note": "engine agreement needs both engines (--engine both)"}
    metrics = agreement_metrics(measured.agreement)
    checks = {name: check(metrics[name], threshold) for name, threshold in contract.parity.agreement.items()}
    failed = any(c["verdict"] == FAIL for c in checks.values())
    return {
        "verdict": FAIL if failed else PASS,
        "model": measured.agreement_model,
        "metrics": metrics,
        "checks": checks,
        "side": measured.agreement_side if failed else None,
        "note": "torch on the base weights vs llama.cpp on the base GGUF, same positions",
    }


def _tensor_section(errors: dict[str, float], thresholds: dict[str, Threshold], base: LoadedModel,
                    quant: LoadedModel) -> dict[str, Any]:
    threshold = thresholds.get("rel_rmse")
    worst = sorted(errors.items(), key=lambda item: math.inf if math.isnan(item[1]) else item[1], reverse=True)
    flagged_names = [name for name, error in worst if threshold is not None and not threshold.passes(error)]
    flagged = [
        {"name": name, "rel_rmse": finite(errors[name]),
         "cause": diagnose_tensor(name, base.weights, quant.weights, base.config, flagged_names)}
        for name in flagged_names
    ]
    checks = {} if threshold is None else {"rel_rmse": check(finite(worst[0][1]), threshold)}
    return {
        "verdict": FAIL if flagged else PASS,
        "checks": checks,
        "worst": [{"name": name, "rel_rmse": finite(error)} for name, error in worst[:5]],
        "flagged": flagged,
    }
