"""Falsifiable predictions: `shipkit train --predict "best_val_loss < 8.911"`.

A prediction is stated before the run, recorded in the training evidence before the first step,
and judged against the run's own summary when the run ends: CONFIRMED or FALSIFIED. The grammar
is deliberately tiny, `<field> <op> <number>`, and parsed with a regular expression (never
evaluated as Python). Format and verdicts: docs/gates.md.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shipkit.errors import InputError

# The numeric `summary` fields of evidence/training-summary.json a prediction may name.
FIELDS = ("best_val_loss", "final_val_loss", "best_epoch", "epochs_completed", "steps_completed")
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
}
PENDING, CONFIRMED, FALSIFIED, UNDECIDED = "PENDING", "CONFIRMED", "FALSIFIED", "UNDECIDED"
_EXPRESSION = re.compile(
    r"\s*(?P<field>[a-z_]+)\s*(?P<op><=|>=|==|<|>)\s*"
    r"(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"
)


@dataclass(frozen=True)
class Prediction:
    field: str
    op: str
    value: float

    @property
    def expr(self) -> str:
        number = int(self.value) if self.value.is_integer() else self.value
        return f"{self.field} {self.op} {number!r}"

    def holds(self, observed: float) -> bool:
        return OPERATORS[self.op](observed, self.value)


def parse_prediction(text: str) -> Prediction:
    """`"best_val_loss < 8.911"` -> Prediction. Raises InputError naming the fault."""
    match = _EXPRESSION.fullmatch(text)
    if match is None:
        raise InputError(
            f"predict {text!r}: expected `<field> <op> <number>` with op one of "
            f"{' '.join(sorted(OPERATORS))}, e.g. \"best_val_loss < 8.911\""
        )
    field = match["field"]
    if field not in FIELDS:
        raise InputError(f"predict {text!r}: unknown field {field!r} (known: {', '.join(FIELDS)})")
    value = float(match["number"])
    if not math.isfinite(value):
        raise InputError(f"predict {text!r}: the number must be finite")
    return Prediction(field=field, op=match["op"], value=value)


def record_predictions(texts: Iterable[str], now: datetime | None = None) -> list[dict[str, Any]]:
    """Parse every expression (all before any is recorded) into PENDING evidence entries."""
    parsed = [parse_prediction(text) for text in texts]
    stamp = (now or datetime.now(UTC)).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return [
        {"expr": p.expr, "field": p.field, "op": p.op, "value": p.value, "recorded_at": stamp,
         "observed": None, "verdict": PENDING}
        for p in parsed
    ]


def judge_predictions(predictions: list[dict[str, Any]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each recorded prediction judged against a finished run's `summary`: CONFIRMED or
    FALSIFIED, or UNDECIDED when the run never produced the field (e.g. no epoch completed)."""
    judged = []
    for entry in predictions:
        prediction = Prediction(field=entry["field"], op=entry["op"], value=entry["value"])
        observed = summary.get(prediction.field)
        if observed is None:
            verdict = UNDECIDED
        else:
            verdict = CONFIRMED if prediction.holds(observed) else FALSIFIED
        judged.append({**entry, "observed": observed, "verdict": verdict})
    return judged
