"""The single-process CUDA training step: one CUDA graph over a bfloat16 working copy.

The model's float32 parameters stay the master weights: checkpoints, evaluation and resume
read and write them as usual. The step computes with a bfloat16 copy of the model (the GPU
layout of `LanguageModelLoss`, compiled), and one Triton kernel per tensor applies AdamW to the
master weight from the copy's bfloat16 gradient and writes the new bfloat16 copy in the same
pass. Compared with autocast over float32 parameters this drops the per-step weight casts, the
gradient casts and a float32 gradient buffer, and clipping costs only the norm. Forward,
backward, norm and update are captured as one CUDA graph on the first call and replayed after,
so a step is a single launch instead of about a thousand.

The Adam moments live in the `torch.optim.AdamW` built by `build_optimizer` (its state is what
resume saves), with one shared step counter on the GPU; that optimizer's `step()` is not used.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch

from shipkit.model import CausalLM
from shipkit.train.step import training_model

UPDATE_BLOCK = 1024
UPDATE_WARPS = 4  # measured on an H100: 2.7 TB/s over the model-2 tensors (4096 × 8 warps: 2.6)


@functools.cache
def _update_kernel() -> Any:
    """AdamW (torch's decoupled-decay formulation) on one float32 master tensor, reading the
    bfloat16 gradient scaled by the clipping factor and writing the bfloat16 working copy."""
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_master_update(
        master_ptr, working_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, n_elements,
        lr_ptr, grad_factor_ptr, step_ptr, beta1, beta2, eps, weight_decay,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        lr = tl.load(lr_ptr)
        step = tl.load(step_ptr)
        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32) * tl.load(grad_factor_ptr)
        param = tl.load(master_ptr + offsets, mask=mask)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask)

        param = param - lr * weight_decay * param
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        bias_correction1 = 1 - tl.exp(step * tl.log(beta1))
        bias_correction2 = 1 - tl.exp(step * tl.log(beta2))
        denom = tl.sqrt(exp_avg_sq) / tl.sqrt(bias_correction2) + eps
        param = param - (lr / bias_correction1) * exp_avg / denom

        tl.store(master_ptr + offsets, param, mask=mask)
        tl.store(working_ptr + offsets, param.to(tl.bfloat16), mask=mask)
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)

    return adamw_master_update


class _Update:
    """One tensor's share of the optimizer step."""

    def __init__(self, master: torch.Tensor, working: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]) -> None:
        self.master, self.working = master, working
        self.exp_avg, self.exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        self.beta1, self.beta2 = group["betas"]
        self.eps, self.weight_decay = group["eps"], group["weight_decay"]

    def launch(self, grad: torch.Tensor, lr: torch.Tensor, grad_factor: torch.Tensor, step: torch.Tensor) -> None:
        numel = self.master.numel()
        _update_kernel()[(-(-numel // UPDATE_BLOCK),)](
            self.master, self.working, grad, self.exp_avg, self.exp_avg_sq, numel,
            lr, grad_factor, step, self.beta1, self.beta2, self.eps, self.weight_decay,
            BLOCK=UPDATE_BLOCK, num_warps=UPDATE_WARPS,
        )


class GraphedTrainStep:
    """Same contract as `shipkit.train.step.train_step` (the loss and the pre-clipping gradient
    norm), for one CUDA process and batches of one shape."""

    def __init__(self, model: CausalLM, optimizer: torch.optim.AdamW, *, grad_clip: float) -> None:
        self.model = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, batch: torch.Tensor, *, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None:
            self._capture(batch)
        elif batch.shape != self.static_batch.shape:
            raise ValueError(f"batch shape {tuple(batch.shape)} differs from the captured {tuple(self.static_batch.shape)}")
        self.lr.fill_(lr)
        self.static_batch.copy_(batch)
        self.graph.replay()
        return self.loss.clone(), self.grad_norm.clone()

    def _capture(self, batch: torch.Tensor) -> None:
        device = batch.device
        # Made here, not in __init__, so that weights restored for a resume are the ones copied.
        self.working = copy.deepcopy(self.model).to(torch.bfloat16)
        self.working_params = list(self.working.parameters())
        self.loss_module = training_model(self.working, ddp_device_ids=None, distributed=False, compile_model=True)
        self.static_batch = batch.clone()
        self.lr = torch.zeros((), device=device)
        self.step_count = _share_adam_step(self.optimizer, device)
        working_of = {id(master): working for master, working in zip(self.model.parameters(), self.working_params, strict=True)}
        self.updates = [
            _Update(master, working_of[id(master)], self.optimizer.state[master], group)
            for group in self.optimizer.param_groups
            for master in group["params"]
        ]
        self._warm_up()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._forward_backward()
            self.grad_norm = self._apply_adamw()

    def _forward_backward(self) -> torch.Tensor:
        loss = self.loss_module(self.static_batch[:, :-1], self.static_batch[:, 1:])
        loss.backward()
        return loss.detach()

    def _apply_adamw(self) -> torch.Tensor:
        grads = [working.grad for working in self.working_params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))
        grad_factor = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)  # as clip_grad_norm_
        self.step_count += 1
        for update in self.updates:
            update.launch(update.working.grad, self.lr, grad_factor, self.step_count)
        return norm

    def _warm_up(self) -> None:
        """Compile the model and the update kernel, and let cuBLAS/cuDNN choose and allocate,
        before capture. The passes touch only gradients, which are dropped; the kernel runs on
        scratch tensors."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward_backward()
            one = torch.ones((), device=self.lr.device)
            # Triton compiles one variant per size class (a multiple of 16 or not).
            for size in {16 if update.master.numel() % 16 == 0 else 17 for update in self.updates}:
                scratch = torch.zeros(size, device=one.device)
                state = {"exp_avg": scratch.clone(), "exp_avg_sq": scratch.clone()}
                _Update(scratch, scratch.bfloat16(), state, self.optimizer.param_groups[0]).launch(
                    scratch.bfloat16(), one, one, one
                )
        torch.cuda.current_stream().wait_stream(side)
        self.working.zero_grad(set_to_none=True)


def _share_adam_step(optimizer: torch.optim.AdamW, device: torch.device) -> torch.Tensor:
    """Give every parameter its Adam moments (zeros unless resumed) and one shared step counter
    on the GPU, which the captured update increments."""
    steps = {float(state["step"]) for state in optimizer.state.values() if state}
    if len(steps) > 1:
        raise ValueError(f"Adam step counts differ between parameters: {sorted(steps)}")
    step = torch.tensor(steps.pop() if steps else 0.0, dtype=torch.float32, device=device)
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["step"] = step
    return step
