"""A stage's `device` (auto, cpu or cuda) as a torch device: one rule for every stage that
runs torch."""

from __future__ import annotations

import torch

from shipkit.errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA where a device is available, else the CPU.

    Raises InputError for another word, or for "cuda" where no CUDA device is available.
    """
    if device not in DEVICES:
        raise InputError(f"device {device}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda: no CUDA device is available (use cpu)")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
