"""The entry points of a run: `train` starts one, `resume` continues one. Each checks its inputs
before anything is built, holds RUN_DIR's writer lock, joins the process group under torchrun and
hands the run to the `Trainer`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch.distributed as dist

from shipkit.errors import InputError
from shipkit.layout import TOKENIZER_FILE, RunDir
from shipkit.predict import record_predictions
from shipkit.train.placement import leave_process_group, setup_placement
from shipkit.train.presets import TrainConfig, apply_overrides
from shipkit.train.resume_file import latest_resume_epoch, read_resume_point
from shipkit.train.run_folder import copy_atomic, writer_lock
from shipkit.train.summary import RunState, new_run_id
from shipkit.train.trainer import Trainer

REASON_CHARS = 120  # of the tokenizers library's message, which may quote the crafted file


def _check_fresh_run_dir(run_dir: Path) -> None:
    for taken in (RunDir.CKPT, RunDir.EVIDENCE):
        if (run_dir / taken).exists():
            raise InputError(
                f"run_dir {run_dir}: already holds a run ({taken}/ exists); "
                "resume it or choose another folder"
            )


def _tokenizer_vocab_size(tokenizer_path: Path) -> int:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as error:  # the Rust side raises its own Exception type
        reason = (str(error).splitlines() or [type(error).__name__])[0][:REASON_CHARS]
        raise InputError(f"{tokenizer_path}: the tokenizers library cannot load it ({reason})") from None
    return tokenizer.get_vocab_size(with_added_tokens=True)


def train(
    config: TrainConfig,
    data_dir: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    device: str = "auto",
    compile_model: bool = True,
    progress: bool = True,
    predictions: Sequence[str] = (),
) -> dict[str, Any]:
    """Train a new model on `data_dir` into `run_dir`; returns the training evidence.

    `config.model.vocab_size` is replaced by the tokenizer's vocabulary size. `predictions`
    (`"best_val_loss < 8.9"`, grammar in `shipkit.predict`) are recorded in the evidence before
    the first step and judged when the run ends. Raises InputError for a bad folder, option or
    prediction (before any training), TrainingError when the run stops early (the evidence,
    written first, says why). RUN_DIR is locked while the run writes it (`run_dir_lock`).
    """
    recorded = record_predictions(predictions)
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    tokenizer_path = data_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise InputError(f"data_dir {data_dir}: no {TOKENIZER_FILE} (run `shipkit tokenize encode` first)")
    config = apply_overrides(config, {"vocab_size": _tokenizer_vocab_size(tokenizer_path)})
    with writer_lock(run_dir):
        _check_fresh_run_dir(run_dir)  # under the lock: no other run can start in between
        placement = setup_placement(device)
        if placement.is_main:
            copy_atomic(tokenizer_path, RunDir(run_dir).tokenizer)
        now = datetime.now(UTC).replace(microsecond=0)
        run_id = new_run_id(now)
        if placement.world_size > 1:
            shared = [run_id]
            dist.broadcast_object_list(shared, src=0)
            run_id = shared[0]
        state = RunState(run_id=run_id, date=now.isoformat().replace("+00:00", "Z"), predictions=recorded)
        try:
            return Trainer(config, data_dir, run_dir, placement, compile_model, progress, state).run()
        finally:
            leave_process_group(placement)


def resume(
    run_dir: str | os.PathLike[str],
    *,
    num_steps: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    compile_model: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Continue `run_dir` from its last saved epoch (optionally to a larger `num_steps`).

    On CPU with the same world size the continued losses equal an uninterrupted run's bit for
    bit. `data_dir` defaults to the folder the run was started with. The resume file is checked
    whole (`read_resume_point`) before anything is built, and RUN_DIR is locked while the run
    writes it (`run_dir_lock`).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run_dir {run_dir}: not a folder")
    with writer_lock(run_dir):
        epoch = latest_resume_epoch(run_dir)
        point = read_resume_point(run_dir, epoch)
        config = point.config
        if num_steps is not None:
            config = apply_overrides(config, {"num_steps": num_steps})
        if point.state.step >= config.num_steps:
            raise InputError(
                f"run_dir {run_dir}: the run already reached num_steps {config.num_steps}; "
                "pass a larger num_steps to continue it"
            )
        data_dir = Path(data_dir) if data_dir is not None else point.data_dir
        placement = setup_placement(device)
        try:
            trainer = Trainer(config, data_dir, run_dir, placement, compile_model, progress, point.state)
            if trainer.tokenizer_sha256 != point.tokenizer_sha256:
                raise InputError(
                    f"data_dir {data_dir}: its tokenizer (sha256 {trainer.tokenizer_sha256[:12]}…) is not "
                    f"the one the run was trained with ({point.tokenizer_sha256[:12]}…)"
                )
            trainer.restore(epoch)
            return trainer.run()
        finally:
            leave_process_group(placement)
