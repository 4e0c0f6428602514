"""Training configuration: one dataclass (model + optimisation + run length) and named presets.

Any field can be overridden by name (`--set hidden_size=256`); model fields and training fields
share one flat namespace because their names never collide.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from shipkit.errors import InputError
from shipkit.model import ModelConfig


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
    memorization_threshold: float = 0.1  # nats; see docs/evidence.md

    def __post_init__(self) -> None:
        positive = ("batch_size", "seq_len", "num_steps", "steps_per_epoch", "val_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"train config field {name}: must be at least 1")
        if self.lr <= 0:
            raise InputError("train config field lr: must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InputError("train config field min_lr_ratio: must be between 0 and 1")
        if self.warmup_steps < 0:
            raise InputError("train config field warmup_steps: must be 0 or more")
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


def _parse_value(name: str, raw: str, current: Any) -> Any:
    if isinstance(current, bool):
        lowered = raw.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise InputError(f"--set {name}={raw}: expected true or false")
        return lowered in ("true", "1")
    try:
        return type(current)(raw)
    except ValueError:
        raise InputError(
            f"--set {name}={raw}: expected a {type(current).__name__}"
        ) from None


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A copy of `config` with fields replaced; values may be strings (parsed to the field's type)."""
    model_changes: dict[str, Any] = {}
    train_changes: dict[str, Any] = {}
    for name, value in overrides.items():
        if name in MODEL_FIELDS:
            target, current = model_changes, getattr(config.model, name)
        elif name in TRAIN_FIELDS:
            target, current = train_changes, getattr(config, name)
        else:
            known = ", ".join(sorted(MODEL_FIELDS) + sorted(TRAIN_FIELDS))
            raise InputError(f"--set {name}: unknown field (known: {known})")
        target[name] = _parse_value(name, value, current) if isinstance(value, str) else value
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
            raise InputError(f"--set {item!r}: expected key=value")
        overrides[name.strip()] = value.strip()
    return overrides


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise InputError(f"--preset {name}: unknown preset (known: {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name])
