"""The fused LM head + cross-entropy used by CUDA training (`shipkit.train.fused_loss`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shipkit.train import fused_loss
from shipkit.train.fused_loss import linear_cross_entropy

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [50257, 1000, 64])
def test_fused_loss_and_gradients_match_float32_cross_entropy(dtype: torch.dtype, vocab: int) -> None:
    """Rows beyond one pass of the grid, a vocabulary that needs padding or not, an incoming
    gradient other than 1, and float32 inputs (the autocast path) getting float32 gradients."""
    torch.manual_seed(0)
    rows = 2 * fused_loss.LOSS_PROGRAMS + 3
    hidden = torch.randn(rows // 3, 3, 256, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(vocab, 256, device="cuda") * 0.1).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows // 3, 3), device="cuda")

    loss = linear_cross_entropy(hidden, weight, targets)
    (3 * loss).backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(F.linear(hidden.double(), weight.double()).flatten(0, 1), targets.flatten())
    (3 * reference).backward()

    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    torch.testing.assert_close(loss.double(), reference, atol=2e-2 if dtype == torch.bfloat16 else 5e-3, rtol=0)
    for grad, expected in zip(grads, (hidden.grad, weight.grad), strict=True):
        relative = (grad.double() - expected).norm() / expected.norm()
        assert relative < 1e-2
