"""Training: from a token folder to a run folder with epoch checkpoints and training evidence.

What lives where:

    entry.py         train() and resume(): check the inputs, lock RUN_DIR, join the process group,
                     hand over to the Trainer
    trainer.py       the Trainer: model, optimizer and step, the epoch loop, validation, the epoch
                     files (weights, metadata, best.apr, resume companion)
    step.py          one optimizer step (eager, compiled or under DDP): loss module, AdamW, LR
                     schedule, Adam state as named tensors
    graphed_step.py  the single-GPU step: one CUDA graph over a bfloat16 working copy
    fused_loss.py    the LM head + cross-entropy as one Triton-backed node (CUDA only)
    data.py          the train stream, the fixed validation set, the train_fraction subset
    presets.py       TrainConfig, the named presets and `--set` overrides
    verdicts.py      what the loss curves say: verdict, convergence, divergence, early stop
    summary.py       the run's state and the training-summary evidence built from it
    resume_file.py   finding the latest resume file and checking it whole before a resume
    run_folder.py    the run folder's writer lock (its file names: shipkit.layout.RunDir)
    placement.py     device, DDP rank and the collectives the trainer uses
    compare.py       `shipkit compare`: several runs' evidence and loss curves side by side

`train`, `resume` and `run_dir_lock` are importable from here. They load on first use, so that
importing a light module such as `shipkit.train.presets` (the CLI's preset names) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shipkit.train.entry import resume, train
    from shipkit.train.run_folder import run_dir_lock

__all__ = ["resume", "run_dir_lock", "train"]

_HOME_MODULE = {
    "train": "shipkit.train.entry",
    "resume": "shipkit.train.entry",
    "run_dir_lock": "shipkit.train.run_folder",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME_MODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME_MODULE[name]), name)
