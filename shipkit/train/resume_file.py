"""Resume files (`ckpt/epoch-NNN.resume.apr`): finding the latest one and reading it back with
every field checked against the others and against the tensors before anything is built (rules:
docs/training.md, "Resume"). The trainer writes them (`Trainer.save_epoch`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shipkit.apr import read_apr
from shipkit.config import ModelConfig, finite_float, is_int, shown, weight_shapes
from shipkit.errors import InputError
from shipkit.layout import RunDir
from shipkit.predict import Prediction, parse_prediction
from shipkit.train.presets import TrainConfig
from shipkit.train.summary import RunState

# The resume file's `resume` metadata (written by `Trainer.save_epoch`).
RESUME_KEYS = {"state", "adam_step", "hyperparameters", "data_dir", "world_size"}
# The numbers of an epoch record that the verdicts of a resumed run read again.
EPOCH_RECORD_NUMBERS = ("train_loss", "val_loss", "gap", "wraps")
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
RNG_CPU_TENSOR = "rng.torch_cpu"
RNG_CUDA_TENSOR = "rng.torch_cuda"


def latest_resume_epoch(run_dir: Path) -> int:
    """Highest epoch with a complete resume companion; InputError if there is none."""
    epochs = RunDir(run_dir).resume_epochs()
    if not epochs:
        raise InputError(
            f"run_dir {run_dir}: no ckpt/epoch-NNN.resume.apr found (the run saved no epoch yet)"
        )
    return max(epochs)


@dataclass
class ResumePoint:
    """What a resume file restores besides tensors, checked."""

    config: TrainConfig
    state: RunState
    tokenizer_sha256: str
    data_dir: Path


def read_resume_point(run_dir: Path, epoch: int) -> ResumePoint:
    """`epoch`'s resume file and weights file, their metadata checked against each other and
    against the tensors (rules in docs/training.md, "Resume"). Raises InputError naming the
    file and field, IntegrityError for a corrupt file; reads no tensor data."""
    path = RunDir(run_dir).resume(epoch)
    checkpoint = read_apr(path, verify=False)
    try:
        point = _resume_point(checkpoint.metadata, epoch)
        _check_resume_tensors(checkpoint.tensors, point.config.model)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    weights = read_apr(RunDir(run_dir).epoch(epoch), verify=False)
    if weights.metadata.get("kind") != "weights" or weights.config != point.config.model:
        raise InputError(f"{weights.path}: not the weights of {path.name} (kind or model config differs)")
    return point


def _resume_point(metadata: dict[str, Any], epoch: int) -> ResumePoint:
    if metadata.get("kind") != "resume":
        raise InputError(f"metadata kind: {shown(metadata.get('kind'))}, expected 'resume'")
    saved = metadata.get("resume")
    if not isinstance(saved, dict) or set(saved) != RESUME_KEYS:
        raise InputError(f"metadata resume: expected an object with keys {', '.join(sorted(RESUME_KEYS))}")
    config = TrainConfig.from_dict(saved["hyperparameters"], metadata.get("config"))
    state = _run_state(saved["state"])
    world_size = saved["world_size"]
    if not is_int(world_size) or world_size < 1:
        raise InputError(f"metadata resume.world_size: expected a positive integer, got {shown(world_size)}")
    if not isinstance(saved["data_dir"], str) or not saved["data_dir"]:
        raise InputError(f"metadata resume.data_dir: expected a folder name, got {shown(saved['data_dir'])}")
    tokenizer_sha256 = (metadata.get("tokenizer") or {}).get("sha256")
    if not isinstance(tokenizer_sha256, str):
        raise InputError("metadata tokenizer.sha256: missing (the run's tokenizer cannot be checked)")
    _check_progress(state, config, epoch)
    if saved["adam_step"] != state.step or not is_int(saved["adam_step"]):
        raise InputError(f"metadata resume.adam_step: {shown(saved['adam_step'])}, but the run is at "
                         f"step {state.step}")
    consumed = state.step * config.batch_size * world_size  # windows, all ranks together
    if state.cursor != consumed:
        raise InputError(f"metadata resume.state.cursor: {state.cursor}, but {state.step} steps of "
                         f"{config.batch_size} sequences on {world_size} rank(s) consumed {consumed} windows")
    return ResumePoint(config, state, tokenizer_sha256, Path(saved["data_dir"]))


def _run_state(data: Any) -> RunState:
    names = {f.name for f in dataclasses.fields(RunState)}
    if not isinstance(data, dict) or not {"run_id", "date"} <= set(data) <= names:
        raise InputError(f"metadata resume.state: expected an object with fields {', '.join(sorted(names))}")
    state = RunState(**data)
    where = "metadata resume.state"
    if not isinstance(state.run_id, str) or not isinstance(state.date, str):
        raise InputError(f"{where}.run_id/date: expected strings")
    for name in ("step", "cursor"):
        value = getattr(state, name)
        if not is_int(value) or value < 0:
            raise InputError(f"{where}.{name}: expected a non-negative integer, got {shown(value)}")
    if not isinstance(state.epochs, list) or not isinstance(state.predictions, list):
        raise InputError(f"{where}.epochs/predictions: expected lists")
    for entry in state.predictions:
        _check_recorded_prediction(entry)
    return state


def _check_recorded_prediction(entry: Any) -> None:
    """A recorded prediction is judged again at the end: its parts must be what its text says."""
    expr = entry.get("expr") if isinstance(entry, dict) else None
    if not isinstance(expr, str):
        raise InputError(f"metadata resume.state.predictions: entry {shown(entry)} has no expr")
    parsed = parse_prediction(expr)
    if parsed != Prediction(field=entry.get("field"), op=entry.get("op"), value=entry.get("value")):
        raise InputError(f"metadata resume.state.predictions: {shown(expr)} differs from its field/op/value")


def _check_progress(state: RunState, config: TrainConfig, epoch: int) -> None:
    """One record per epoch up to the file's, each advancing 1..steps_per_epoch steps, ending
    at the state's step within the plan, and the best epoch one of them."""
    where = "metadata resume.state"
    if epoch < 1 or len(state.epochs) != epoch:
        raise InputError(f"{where}.epochs: {len(state.epochs)} epoch record(s) in the file of epoch {epoch}")
    step = 0
    for number, record in enumerate(state.epochs, start=1):
        step = _check_epoch_record(record, number, step, config.steps_per_epoch)
    if state.step != step:
        raise InputError(f"{where}.step: {state.step}, but epoch {epoch} ended at step {step}")
    if state.step > config.num_steps:
        raise InputError(f"{where}.step: {state.step} is beyond the plan's num_steps {config.num_steps}")
    best = state.best_epoch
    if best is None:
        if state.best_val_loss is not None or state.best_checkpoint is not None:
            raise InputError(f"{where}.best_epoch: null beside a best val loss or checkpoint")
        return
    if not is_int(best) or not 1 <= best <= epoch:
        raise InputError(f"{where}.best_epoch: expected an epoch from 1 to {epoch}, got {shown(best)}")
    if state.best_val_loss != state.epochs[best - 1]["val_loss"]:
        raise InputError(f"{where}.best_val_loss: {shown(state.best_val_loss)} is not epoch {best}'s val loss")
    recorded = state.best_checkpoint
    if not isinstance(recorded, dict) or recorded.get("path") != RunDir.BEST or recorded.get("epoch") != best:
        raise InputError(f"{where}.best_checkpoint: expected {RunDir.BEST} of epoch {best}, got {shown(recorded)}")


def _check_epoch_record(record: Any, number: int, previous_step: int, steps_per_epoch: int) -> int:
    """Epoch `number`'s record checked; returns the step it ended at."""
    where = f"metadata resume.state.epochs[{number - 1}]"
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object, got {shown(record)}")
    if not is_int(record.get("epoch")) or record["epoch"] != number:
        raise InputError(f"{where}.epoch: expected {number}, got {shown(record.get('epoch'))}")
    step = record.get("step")
    if not is_int(step) or not previous_step < step <= previous_step + steps_per_epoch:
        raise InputError(f"{where}.step: expected {previous_step + 1} to {previous_step + steps_per_epoch} "
                         f"(steps_per_epoch {steps_per_epoch} after step {previous_step}), got {shown(step)}")
    for name in EPOCH_RECORD_NUMBERS:
        if finite_float(record.get(name)) is None:
            raise InputError(f"{where}.{name}: expected a finite number, got {shown(record.get(name))}")
    return step


def _check_resume_tensors(tensors: dict[str, torch.Tensor], model: ModelConfig) -> None:
    """Adam's two float32 moments for every weight, shaped as it, and the RNG states (U8)."""
    expected = {f"optimizer.{name}.{moment}": shape
                for name, shape in weight_shapes(model).items() for moment in ADAM_MOMENTS}
    rng_size = torch.get_rng_state().numel()
    for name, tensor in tensors.items():
        if name in expected:
            if tuple(tensor.shape) != expected[name] or tensor.dtype != torch.float32:
                raise InputError(f"tensor {name}: {tensor.dtype} {list(tensor.shape)}, the config implies "
                                 f"torch.float32 {list(expected[name])}")
        elif name in (RNG_CPU_TENSOR, RNG_CUDA_TENSOR):
            if tensor.dtype != torch.uint8 or tensor.dim() != 1 or \
                    (name == RNG_CPU_TENSOR and tensor.numel() != rng_size):
                raise InputError(f"tensor {name}: expected a 1-d U8 RNG state, got {tensor.dtype} "
                                 f"{list(tensor.shape)}")
        else:
            raise InputError(f"tensor {name}: not part of a resume file")
    missing = sorted((set(expected) | {RNG_CPU_TENSOR}) - set(tensors))
    if missing:
        raise InputError(f"tensor {missing[0]}: missing ({len(missing)} in all)")
