"""FALSIFIERS gates: each prediction recorded before training (`shipkit train --predict`), as
judged against the training summary."""

from __future__ import annotations

from shipkit.evidence import DISCHARGED, FAILED, PARTIAL
from shipkit.gates.view import IMPORTED, TRAINING, Gate, RunView, ref
from shipkit.predict import CONFIRMED, FALSIFIED


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
