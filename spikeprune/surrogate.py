"""Surrogate gradients for the spike's Heaviside step (SpikingJelly's `surrogate.Sigmoid`)."""
from __future__ import annotations

import torch


def sigmoid_grad(u: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """d/du of sigmoid(alpha * u): the surrogate derivative used in place of the Dirac delta."""
    sg = torch.sigmoid(alpha * u)
    return alpha * sg * (1.0 - sg)


class _HeavisideSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, alpha: float):
        ctx.save_for_backward(u)
        ctx.alpha = alpha
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (u,) = ctx.saved_tensors
        return grad_out * sigmoid_grad(u, ctx.alpha), None


def heaviside_sigmoid(u: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """Heaviside(u) forward (u >= 0 fires), sigmoid surrogate backward."""
    return _HeavisideSigmoid.apply(u, alpha)
