"""The gate's numbers, as pure functions: per scored position KL(base‖quant), same top-1, both
models' NLL and Δp; their llama-perplexity-style summary; engine agreement; per-layer cosine of
the residual streams; and a value's check against a contract threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shipkit.contract import Threshold
from shipkit.evidence import FAIL, PASS


@dataclass
class PositionStats:
    """Per scored position: KL(base‖quant) in nats, whether the top-1 tokens agree, both
    models' NLL of the true next token, and Δp = p_quant(true) − p_base(true)."""

    kl: np.ndarray
    same_top: np.ndarray
    base_nll: np.ndarray
    quant_nll: np.ndarray
    dp: np.ndarray

    @classmethod
    def concat(cls, parts: list[PositionStats]) -> PositionStats:
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in cls.__dataclass_fields__})


def position_stats(base_logits: torch.Tensor, quant_logits: torch.Tensor, targets: torch.Tensor) -> PositionStats:
    """(N, V) logits of both models and the (N,) true next tokens -> per-position stats,
    computed in float64."""
    base_logp = torch.log_softmax(base_logits.double(), dim=-1)
    quant_logp = torch.log_softmax(quant_logits.double(), dim=-1)
    kl = (base_logp.exp() * (base_logp - quant_logp)).sum(-1)
    same_top = base_logits.argmax(-1) == quant_logits.argmax(-1)
    index = targets.long().unsqueeze(-1)
    base_true = base_logp.gather(-1, index).squeeze(-1)
    quant_true = quant_logp.gather(-1, index).squeeze(-1)
    return PositionStats(
        kl=kl.cpu().numpy(),
        same_top=same_top.cpu().numpy(),
        base_nll=(-base_true).cpu().numpy(),
        quant_nll=(-quant_true).cpu().numpy(),
        dp=(quant_true.exp() - base_true.exp()).cpu().numpy(),
    )


def summarize(stats: PositionStats) -> dict[str, float | None]:
    """The llama-perplexity KL-divergence summary; `None` where a value is not finite."""
    metrics = {
        "kl_mean": float(stats.kl.mean()),
        "kl_p99": float(np.percentile(stats.kl, 99)),
        "kl_max": float(stats.kl.max()),
        "same_top_pct": 100.0 * float(stats.same_top.mean()),
        "ppl_base": _exp(float(stats.base_nll.mean())),
        "ppl_quant": _exp(float(stats.quant_nll.mean())),
        "ppl_ratio": _exp(float(stats.quant_nll.mean() - stats.base_nll.mean())),
        "rms_dp_pct": 100.0 * math.sqrt(float(np.mean(stats.dp**2))),
        "max_abs_dp_pct": 100.0 * float(np.abs(stats.dp).max()),
    }
    return {name: value if math.isfinite(value) else None for name, value in metrics.items()}


def _exp(value: float) -> float:
    """exp that overflows to inf instead of raising."""
    return math.exp(value) if value < 700.0 else math.inf


def finite(value: float) -> float | None:
    """`value`, or None where it is not finite (JSON has no NaN/Inf)."""
    return value if math.isfinite(value) else None


def agreement_metrics(stats: PositionStats) -> dict[str, float | None]:
    """Engine agreement on the same model: top-1 identical %, mean and max KL."""
    summary = summarize(stats)
    return {"top1_pct": summary["same_top_pct"], "kl_mean": summary["kl_mean"], "kl_max": summary["kl_max"]}


def agrees(stats: PositionStats, thresholds: dict[str, Threshold]) -> bool:
    """Whether two runs of the same model agree within the contract's agreement thresholds."""
    metrics = agreement_metrics(stats)
    return all(threshold.passes(metrics[name]) for name, threshold in thresholds.items())


def layer_cosine_sums(base_states: list[torch.Tensor], quant_states: list[torch.Tensor]) -> np.ndarray:
    """Per layer, the sum over positions of the cosine similarity of the two models'
    residual-stream vectors (each list: one (..., d) tensor per layer)."""
    return np.array(
        [
            torch.nn.functional.cosine_similarity(b.double(), q.double(), dim=-1).sum().item()
            for b, q in zip(base_states, quant_states, strict=True)
        ]
    )


def check(value: float | None, threshold: Threshold) -> dict[str, Any]:
    return {"value": value, **threshold.to_dict(), "verdict": PASS if threshold.passes(value) else FAIL}


@dataclass
class EngineResult:
    """One engine's comparison of base and quant over all windows."""

    name: str
    device: str
    seconds: float = 0.0
    parts: list[PositionStats] = field(default_factory=list)
    cosine_sums: np.ndarray | None = None
    cosine_count: int = 0

    def add_cosines(self, sums: np.ndarray, count: int) -> None:
        self.cosine_sums = sums if self.cosine_sums is None else self.cosine_sums + sums
        self.cosine_count += count

    def hidden_cosine(self) -> list[float | None] | None:
        """Mean cosine per layer (None for a non-finite one), or None without layer outputs."""
        if self.cosine_sums is None:
            return None
        return [finite(float(total / self.cosine_count)) for total in self.cosine_sums]
