"""CARD gates: the model card parses, carries the contract's required fields, states the numbers
the evidence holds (best val loss, the GGUF card's parity KL), and was rendered from the evidence
now on disk."""

from __future__ import annotations

from typing import Any

from shipkit.evidence import DISCHARGED, FAILED, PARTIAL
from shipkit.fsutil import sha256_file
from shipkit.gates.view import (
    PARITY,
    RELEASE,
    TRAINING,
    Gate,
    RunView,
    card_front_matter,
    ref,
)
from shipkit.layout import RunDir


def card_gates(view: RunView) -> list[Gate]:
    data, problem = card_front_matter(view.files.card)
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
    gguf_data, _ = card_front_matter(view.files.gguf_card)
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
