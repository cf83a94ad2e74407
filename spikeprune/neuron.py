"""Multi-step LIF neuron, as the reference Spikformer code configures SpikingJelly's LIFNode.

Per time step t (v starts at v_reset = 0 on every forward call, so no state survives):
    h = v + (x_t - (v - v_reset)) / tau          # charge, decay_input=True
    s = Heaviside(h - v_threshold)               # fire (h >= threshold gives 1, as SpikingJelly)
    v = h * (1 - s') + v_reset * s'              # hard reset; s' = s detached (detach_reset=True)
Backward of the Heaviside is the sigmoid surrogate: alpha * sg * (1 - sg), sg = sigmoid(alpha * u).

The whole T-step loop is one autograd Function with a hand-written BPTT backward: the forward
runs a handful of element-wise kernels per step and keeps only the membrane potentials, instead
of the dozen autograd nodes per step a transcription of SpikingJelly would record.
"""
from __future__ import annotations

import torch
from torch import nn

from .surrogate import sigmoid_grad


class _MultiStepLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tau: float, v_threshold: float, alpha: float):
        spikes = torch.empty_like(x)
        keep = ctx.needs_input_grad[0]
        hs = torch.empty_like(x) if keep else None
        v = torch.zeros_like(x[0])
        for t in range(x.shape[0]):
            h = v + (x[t] - v) / tau
            s = h >= v_threshold
            spikes[t] = s
            if keep:
                hs[t] = h
            v = h.masked_fill(s, 0.0)
        if keep:
            ctx.save_for_backward(hs, spikes)
        ctx.consts = (tau, v_threshold, alpha)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        hs, spikes = ctx.saved_tensors
        tau, v_threshold, alpha = ctx.consts
        grad_x = torch.empty_like(grad_spikes)
        grad_v = None  # dL/dv_t carried backwards through time
        for t in range(hs.shape[0] - 1, -1, -1):
            grad_h = grad_spikes[t] * sigmoid_grad(hs[t] - v_threshold, alpha)
            if grad_v is not None:
                grad_h = grad_h + grad_v * (1.0 - spikes[t])  # reset is detached: dv/dh = 1 - s
            grad_x[t] = grad_h / tau
            grad_v = grad_h * (1.0 - 1.0 / tau)
        return grad_x, None, None, None


def lif_multistep(x: torch.Tensor, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0) -> torch.Tensor:
    """Spikes [T, ...] of a multi-step LIF driven by input currents x [T, ...]."""
    return _MultiStepLIF.apply(x, tau, v_threshold, alpha)


class LIF(nn.Module):
    """Multi-step LIF: input [T, ...], output spikes of the same shape. Holds no parameters or state.

    `last_rate` keeps the mean firing rate of the last forward when `record_rate` is on; the
    measure and importance code turn it on to count synaptic operations.
    """

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0):
        super().__init__()
        self.tau, self.v_threshold, self.alpha = float(tau), float(v_threshold), float(alpha)
        self.record_rate = False
        self.last_rate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = lif_multistep(x, self.tau, self.v_threshold, self.alpha)
        if self.record_rate:
            self.last_rate = s.detach().mean()
        return s

    def extra_repr(self) -> str:
        return f"tau={self.tau}, v_threshold={self.v_threshold}, surrogate=sigmoid(alpha={self.alpha})"


def lif_reference_loop(x: torch.Tensor, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0,
                       v_reset: float = 0.0) -> torch.Tensor:
    """Plain autograd transcription of SpikingJelly's multi-step LIFNode (tests compare against it)."""
    from .surrogate import heaviside_sigmoid

    v = torch.full_like(x[0], v_reset)
    out = []
    for t in range(x.shape[0]):
        h = v + (x[t] - (v - v_reset)) / tau
        s = heaviside_sigmoid(h - v_threshold, alpha)
        sd = s.detach()
        v = h * (1.0 - sd) + v_reset * sd
        out.append(s)
    return torch.stack(out)
