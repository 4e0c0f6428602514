"""Training configuration: one dataclass (model + optimisation + run length) and named presets.

Any field can be overridden by name (`--set hidden_size=256`); model fields and training fields
share one flat namespace because their names never collide.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shipkit.config import ModelConfig, finite_float, is_int, shown
from shipkit.errors import InputError

# Upper bounds of the run's counts, checked before anything is allocated.
MAX_BATCH_SIZE = 1 << 16  # sequences per step and rank: each batch is allocated whole
MAX_COUNT = 1 << 53  # steps and tokens: the schedule divides them as floats, exact up to 2^53
MAX_SEED = (1 << 64) - 1  # torch.manual_seed takes an unsigned 64-bit seed
# AdamW moves a weight by about lr a step, so anything above ~1 diverges (and stops loudly);
# beyond float32's 3.4e38 torch's AdamW fails outright. 1e4 leaves room to watch a divergence.
MAX_LR = 1e4
# Integer fields -> (least, largest) value.
INT_FIELD_RANGES: dict[str, tuple[int, int]] = {
    "batch_size": (1, MAX_BATCH_SIZE),
    "seq_len": (1, MAX_COUNT),  # and at most the model's max_position_embeddings
    "num_steps": (1, MAX_COUNT),
    "steps_per_epoch": (1, MAX_COUNT),
    "warmup_steps": (0, MAX_COUNT),
    "seed": (0, MAX_SEED),
    "val_tokens": (1, MAX_COUNT),
    "early_stop_patience": (0, MAX_COUNT),  # 0: never stop early
    "overfitting_rise_epochs": (1, MAX_COUNT),
}
# Float fields -> (the rule a finite value must meet, the rule in words).
FLOAT_FIELD_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "lr": (lambda value: 0 < value <= MAX_LR, f"in (0, {MAX_LR:g}]"),
    "min_lr_ratio": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "weight_decay": (lambda value: value >= 0, ">= 0"),
    "grad_clip": (lambda value: value > 0, "> 0"),
    "beta1": (lambda value: 0 <= value < 1, "in [0, 1)"),  # AdamW refuses 1 and above
    "beta2": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "memorization_threshold": (lambda value: value >= 0, ">= 0"),
    "overfitting_gap_growth": (lambda value: value >= 0, ">= 0"),
    "train_fraction": (lambda value: 0 < value <= 1, "in (0, 1]"),  # a share of the train windows
}


@dataclass
class TrainConfig:
    """What `shipkit train` runs. `model.vocab_size` is replaced by the tokenizer's size."""

    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str = "custom"
    batch_size: int = 16  # sequences per optimizer step and rank
    seq_len: int = 512
    num_steps: int = 1000
    steps_per_epoch: int = 100
    lr: float = 3e-4  # peak, reached after warmup
    min_lr_ratio: float = 0.01  # cosine decays to lr × this at num_steps
    warmup_steps: int = 100
    weight_decay: float = 0.01  # on matrices only; norms and biases are not decayed
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    seed: int = 42
    val_tokens: int = 65536  # size of the fixed validation set drawn from the val split
    # Verdict thresholds (rules: docs/evidence.md, "summary.memorization").
    memorization_threshold: float = 0.1  # nats: val and train "agree" within it
    # nats beyond the first pass's gap: train perplexity 1.65x below val's is the model fitting its own text
    overfitting_gap_growth: float = 0.5
    overfitting_rise_epochs: int = 2  # consecutive val rises (train falling) that make a turn, not noise
    early_stop_patience: int = 0  # stop after this many epochs without a new best val loss; 0: never
    train_fraction: float = 1.0  # share of the train split's windows the run trains on (docs/training.md)

    def __post_init__(self) -> None:
        """Every field checked (type, range) so that a bad override fails here, naming the
        field, not as a NaN loss or a crash mid-run."""
        if not isinstance(self.model, ModelConfig):
            raise InputError(f"train config field model: expected a ModelConfig, got {shown(self.model)}")
        if not isinstance(self.preset, str):
            raise InputError(f"train config field preset: expected a name, got {shown(self.preset)}")
        for name, (least, largest) in INT_FIELD_RANGES.items():
            value = getattr(self, name)
            if not is_int(value) or not least <= value <= largest:
                raise InputError(f"train config field {name}: expected an integer from {least} to "
                                 f"{largest}, got {shown(value)}")
        for name, (holds, rule) in FLOAT_FIELD_RULES.items():
            value = finite_float(getattr(self, name))
            if value is None or not holds(value):
                raise InputError(f"train config field {name}: expected a finite number {rule}, "
                                 f"got {shown(getattr(self, name))}")
            setattr(self, name, value)
        if self.seq_len > self.model.max_position_embeddings:
            raise InputError(
                f"train config field seq_len: {self.seq_len} exceeds the model's "
                f"max_position_embeddings {self.model.max_position_embeddings}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Training fields only; the model is `self.model.to_dict()`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}

    @classmethod
    def from_dict(cls, hyperparameters: dict[str, Any], model: dict[str, Any]) -> TrainConfig:
        """The config of `to_dict()` and `model.to_dict()`; InputError naming the field for
        anything else."""
        if not isinstance(hyperparameters, dict):
            raise InputError(f"train config: expected an object, got {shown(hyperparameters)}")
        unknown = sorted(set(hyperparameters) - set(TRAIN_FIELDS))
        if unknown:
            raise InputError(f"train config: unknown field(s) {shown(', '.join(unknown))}")
        return cls(model=ModelConfig.from_dict(model), **hyperparameters)


MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "model"}

PRESETS: dict[str, TrainConfig] = {
    # Small enough to train on the stdlib corpus on a 2-core CPU in a few minutes.
    "tiny": TrainConfig(
        model=ModelConfig(
            vocab_size=8192,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
        preset="tiny",
        batch_size=16,
        seq_len=128,
        num_steps=400,
        steps_per_epoch=50,
        lr=2e-3,
        warmup_steps=30,
        val_tokens=16384,
    ),
    # The MODEL-2 recipe: a 370M Llama trained from scratch on CodeSearchNet-Python.
    "model-2": TrainConfig(
        model=ModelConfig(
            vocab_size=50257,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
        preset="model-2",
        batch_size=16,
        seq_len=512,
        num_steps=20000,
        steps_per_epoch=1000,
        lr=3e-4,
        warmup_steps=1000,
        val_tokens=1 << 20,
    ),
}


NULL_WORDS = ("none", "null")  # how --set clears an optional field (head_dim, rope_scaling)


def _parse_value(name: str, raw: str, kind: str) -> Any:
    """`raw` as the field's declared type (`kind`, its annotation): true/false for a bool, a
    number for int and float, JSON for rope_scaling; the config's own checks then judge it."""
    if kind.endswith("| None") and raw.lower() in NULL_WORDS:
        return None
    kind = kind.removesuffix("| None").strip()
    if kind == "bool":
        lowered = raw.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise InputError(f"{name}: expected true or false, got {raw!r}")
        return lowered in ("true", "1")
    if kind == "str":
        return raw
    parse: Callable[[str], Any] = {"int": int, "float": float}.get(kind, json.loads)
    try:
        return parse(raw)
    except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
        expected = {"int": "an int", "float": "a float"}.get(kind, "a JSON value")
        raise InputError(f"{name}: expected {expected}, got {raw!r}") from None


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A copy of `config` with fields replaced; values may be strings (parsed to the field's type)."""
    model_changes: dict[str, Any] = {}
    train_changes: dict[str, Any] = {}
    for name, value in overrides.items():
        if name in MODEL_FIELDS:
            target, kind = model_changes, MODEL_FIELDS[name].type
        elif name in TRAIN_FIELDS:
            target, kind = train_changes, TRAIN_FIELDS[name].type
        else:
            known = ", ".join(sorted(MODEL_FIELDS) + sorted(TRAIN_FIELDS))
            raise InputError(f"{name}: unknown field (known: {known})")
        target[name] = _parse_value(name, value, str(kind)) if isinstance(value, str) else value
    if model_changes.keys() & {"hidden_size", "num_attention_heads"} and "head_dim" not in model_changes:
        model_changes["head_dim"] = None  # follow the new shape, as it did before head_dim was a field
    model = dataclasses.replace(config.model, **model_changes)
    return dataclasses.replace(config, model=model, **train_changes)


def parse_set_options(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`["hidden_size=256", ...]` -> `{"hidden_size": "256"}`."""
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError(f"overrides: {item!r} is not key=value")
        overrides[name.strip()] = value.strip()
    return overrides


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise InputError(f"preset: unknown preset {name!r} (one of {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name])
