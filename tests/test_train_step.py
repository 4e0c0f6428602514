"""The optimizer steps: clipping inside fused AdamW, and the graphed single-GPU step."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_model import SMALL as SMALL_SHAPE

from shipkit.config import ModelConfig
from shipkit.model import CausalLM
from shipkit.train import resume, train
from shipkit.train.graphed_step import GraphedTrainStep
from shipkit.train.presets import apply_overrides, get_preset
from shipkit.train.step import (
    LanguageModelLoss,
    build_optimizer,
    optimizer_tensors,
    train_step,
    training_model,
)
from shipkit.train.trainer import Trainer

SMALL = ModelConfig(**SMALL_SHAPE)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _fused_and_plain_adamw():
    torch.manual_seed(0)
    model = CausalLM(SMALL)
    twin = copy.deepcopy(model)
    options = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    return model, build_optimizer(model, **options, fused=True)[0], twin, build_optimizer(twin, **options, fused=False)[0]


def _batches(count: int, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, SMALL.vocab_size, (2, 33), generator=generator).to(device) for _ in range(count)]


def test_gpu_layout_loss_equals_the_plain_loss_in_float32() -> None:
    """Fused products and precomputed RoPE tables change neither the loss nor the gradients
    (the residual dtype is the layout's one lossy change, so it is left float32 here)."""
    torch.manual_seed(0)
    model = CausalLM(SMALL)
    batch = _batches(1, "cpu")[0]
    plain_loss = LanguageModelLoss(model)(batch[:, :-1], batch[:, 1:])
    plain_loss.backward()
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    gpu_loss_module = LanguageModelLoss(model, gpu_layout=True)
    gpu_loss_module.residual_dtype = None
    gpu_loss = gpu_loss_module(batch[:, :-1], batch[:, 1:])
    gpu_loss.backward()
    torch.testing.assert_close(gpu_loss, plain_loss, atol=1e-5, rtol=0)
    for param, plain_grad in zip(model.parameters(), plain_grads, strict=True):
        torch.testing.assert_close(param.grad, plain_grad, atol=1e-6, rtol=0)


def test_clipping_inside_fused_adamw_equals_clip_grad_norm_then_step() -> None:
    fused_model, fused_opt, plain_model, plain_opt = _fused_and_plain_adamw()
    for batch in _batches(4, "cpu"):
        fused_loss, fused_norm = train_step(
            LanguageModelLoss(fused_model), list(fused_model.parameters()), fused_opt, batch, lr=1e-2, grad_clip=0.5, bf16=False
        )
        plain_loss, plain_norm = train_step(
            LanguageModelLoss(plain_model), list(plain_model.parameters()), plain_opt, batch, lr=1e-2, grad_clip=0.5, bf16=False
        )
        assert plain_norm > 0.5  # the clip is active
        torch.testing.assert_close(fused_loss, plain_loss, atol=1e-5, rtol=0)
        torch.testing.assert_close(fused_norm, plain_norm, rtol=1e-5, atol=0)
    for fused_param, plain_param in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(fused_param, plain_param, atol=1e-5, rtol=0)


@needs_cuda
def test_graphed_step_follows_the_autocast_step() -> None:
    """The graphed step (bfloat16 working copy, float32 masters, its own AdamW kernel) tracks the
    multi-GPU step (autocast over float32 parameters, torch's fused AdamW) from the same start."""
    torch.manual_seed(0)
    graphed_model = CausalLM(SMALL).cuda()
    plain_model = copy.deepcopy(graphed_model)
    initial = [p.detach().clone() for p in plain_model.parameters()]
    options = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    graphed_opt, names = build_optimizer(graphed_model, **options, fused=False)
    plain_opt, _ = build_optimizer(plain_model, **options, fused=True)
    graphed = GraphedTrainStep(graphed_model, graphed_opt, grad_clip=0.5)
    plain_module = training_model(plain_model, ddp_device_ids=None, distributed=False, compile_model=True)
    for step, batch in enumerate(_batches(6, "cuda")):
        lr = 1e-3 * (step + 1) / 6  # a changing learning rate must reach the captured step
        graphed_loss, graphed_norm = graphed(batch, lr=lr)
        plain_loss, plain_norm = train_step(
            plain_module, list(plain_model.parameters()), plain_opt, batch, lr=lr, grad_clip=0.5, bf16=True
        )
        assert plain_norm > 0.5  # the clip is active
        torch.testing.assert_close(graphed_loss, plain_loss, atol=5e-3, rtol=0)
        torch.testing.assert_close(graphed_norm, plain_norm, rtol=1e-2, atol=0)

    for graphed_param, plain_param, start in zip(graphed_model.parameters(), plain_model.parameters(), initial, strict=True):
        moved = (plain_param - start).abs().mean()
        assert moved > 0
        assert (graphed_param - plain_param).abs().mean() < 0.1 * moved
    for master, working in zip(graphed_model.parameters(), graphed.working_params, strict=True):
        assert torch.equal(working, master.detach().bfloat16())
    moments, adam_step = optimizer_tensors(graphed_opt, names)
    assert adam_step == 6
    assert len(moments) == 2 * len(list(graphed_model.parameters()))


@needs_cuda
def test_cuda_training_resumes_with_a_recaptured_graph(
    tiny_tokens_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = apply_overrides(get_preset("tiny"), {
        "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "seq_len": 32, "batch_size": 4, "num_steps": 20, "steps_per_epoch": 5,
        "warmup_steps": 2, "val_tokens": 512,
    })
    straight = train(config, tiny_tokens_dir, tmp_path / "straight", device="cuda", progress=False)

    finish_epoch = Trainer._finish_epoch

    def interrupt_after_epoch_2(trainer: Trainer, record: dict, val_loss: float) -> None:
        finish_epoch(trainer, record, val_loss)
        if len(trainer.state.epochs) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_finish_epoch", interrupt_after_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            train(config, tiny_tokens_dir, tmp_path / "resumed", device="cuda", progress=False)
    resumed = resume(tmp_path / "resumed", device="cuda", progress=False)

    assert straight["device"]["cuda_graph"] is True
    straight_val = [epoch["val_loss"] for epoch in straight["epochs"]]
    assert straight_val[-1] < straight_val[0]
    assert [epoch["val_loss"] for epoch in resumed["epochs"]] == pytest.approx(straight_val, abs=0.02)
