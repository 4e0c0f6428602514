"""CHECKPOINT gates: the released APR file verifies byte for byte, holds the tensors its config
and the contract expect, is the file the evidence describes (sha256), and its parameter count and
architecture are within the contract's `[model]` expectations."""

from __future__ import annotations

import math

from shipkit.apr import validate_apr
from shipkit.evidence import DISCHARGED, FAILED, PARTIAL
from shipkit.fsutil import sha256_file
from shipkit.gates.view import RELEASE, TRAINING, Gate, RunView, ref


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
