"""One optimizer step, shared by the trainer and `benchmarks/bench_train.py`: the loss module
(one compiled graph for forward + cross-entropy), AdamW with decay on matrices only, the
learning-rate schedule and the Adam state as named tensors for the resume file.

Depends on torch and `shipkit.model` only, so the benchmark runs wherever torch does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shipkit.model import CausalLM, rope_tables

ADAM_EPS = 1e-8


def lr_at(step: int, *, lr: float, warmup_steps: int, num_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr`, then cosine
    decay to `lr × min_lr_ratio` at `num_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, num_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


class LanguageModelLoss(nn.Module):
    """Wraps the model so one compiled module covers forward and the cross-entropy.

    `gpu_layout` selects the GPU training forward (see `CausalLM.final_hidden`): fused q/k/v
    and gate/up products, a bfloat16 residual stream and, on CUDA, the LM head and loss as one
    node (`shipkit.train.fused_loss`). The RoPE tables are computed once here rather than inside
    every compiled step.
    """

    def __init__(self, model: CausalLM, *, gpu_layout: bool = False) -> None:
        super().__init__()
        self.model = model
        config = model.config
        device = next(model.parameters()).device
        self.rope = rope_tables(config, config.max_position_embeddings, device)
        self.gpu_layout = gpu_layout
        self.residual_dtype = torch.bfloat16 if gpu_layout else None
        self.fused_loss: Callable[..., torch.Tensor] | None = None
        if gpu_layout and device.type == "cuda":
            # Imported only here: its decorator imports torch._dynamo (seconds), which CPU
            # training and `import shipkit.train` do not need.
            from shipkit.train.fused_loss import linear_cross_entropy

            self.fused_loss = linear_cross_entropy

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.final_hidden(
            inputs,
            rope=self.rope,
            fused_projections=self.gpu_layout,
            residual_dtype=self.residual_dtype,
        )
        if self.fused_loss is not None:
            return self.fused_loss(hidden, self.model.lm_head.weight, targets)
        logits = self.model.lm_head(hidden)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build_optimizer(
    model: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float, fused: bool
) -> tuple[torch.optim.AdamW, list[list[str]]]:
    """AdamW with weight decay on matrices only (not norms or biases); returns it with the
    parameter names of its two groups, in order."""
    named = list(model.named_parameters())
    decay = [(name, p) for name, p in named if p.dim() >= 2]
    no_decay = [(name, p) for name, p in named if p.dim() < 2]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=ADAM_EPS, fused=fused)
    return optimizer, [[name for name, _ in decay], [name for name, _ in no_decay]]


def train_step(
    loss_module: nn.Module,
    parameters: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    *,
    lr: float,
    grad_clip: float,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on a (B, T + 1) token batch; returns the loss and the pre-clipping gradient
    norm as device tensors (reading them is left to the caller: each read is a sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        loss = loss_module(batch[:, :-1], batch[:, 1:])
    loss.backward()
    if optimizer.defaults.get("fused"):
        grad_norm = _clip_inside_fused_step(optimizer, parameters, grad_clip)
    else:
        grad_norm = nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm.detach()


def _clip_inside_fused_step(
    optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor], max_norm: float
) -> torch.Tensor:
    """Gradient clipping without its own pass over the gradients: the fused AdamW kernel divides
    each gradient by `optimizer.grad_scale` (the hook AMP's GradScaler uses), so setting it to
    1 / clip_grad_norm_'s coefficient clips while the optimizer reads the gradient anyway."""
    norm = nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
    return norm


def optimizer_tensors(
    optimizer: torch.optim.AdamW, names: list[list[str]]
) -> tuple[dict[str, torch.Tensor], int]:
    """The Adam moments by parameter name (`optimizer.<name>.exp_avg|exp_avg_sq`) and the step."""
    tensors: dict[str, torch.Tensor] = {}
    steps = set()
    for group, group_names in zip(optimizer.param_groups, names, strict=True):
        for param, name in zip(group["params"], group_names, strict=True):
            state = optimizer.state.get(param)
            if not state:
                continue
            tensors[f"optimizer.{name}.exp_avg"] = state["exp_avg"]
            tensors[f"optimizer.{name}.exp_avg_sq"] = state["exp_avg_sq"]
            steps.add(int(state["step"]))
    return tensors, steps.pop() if steps else 0


def load_optimizer_tensors(
    optimizer: torch.optim.AdamW, names: list[list[str]], tensors: dict[str, torch.Tensor], step: int
) -> None:
    """Inverse of `optimizer_tensors` (the optimizer must have been built the same way)."""
    state_dict: dict[str, Any] = optimizer.state_dict()
    index = 0
    for group_names in names:
        for name in group_names:
            key = f"optimizer.{name}.exp_avg"
            if key in tensors:
                state_dict["state"][index] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": tensors[key].clone(),
                    "exp_avg_sq": tensors[f"optimizer.{name}.exp_avg_sq"].clone(),
                }
            index += 1
    optimizer.load_state_dict(state_dict)


def training_model(
    model: CausalLM, *, ddp_device_ids: list[int] | None, distributed: bool, compile_model: bool
) -> nn.Module:
    """The module a step calls: the loss wrapper (GPU layout on CUDA), under DDP when
    distributed, compiled if asked."""
    gpu_layout = next(model.parameters()).is_cuda
    loss_module: nn.Module = LanguageModelLoss(model, gpu_layout=gpu_layout)
    if distributed:
        loss_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=ddp_device_ids)
    return torch.compile(loss_module) if compile_model else loss_module
