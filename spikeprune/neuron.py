"""Multi-step LIF neuron, as the reference Spikformer code configures SpikingJelly's LIFNode.

Per time step t (v starts at v_reset = 0 on every forward call, so no state survives):
    h = v + (x_t - (v - v_reset)) / tau          # charge, decay_input=True
    s = Heaviside(h - v_threshold)               # fire (h >= threshold gives 1, as SpikingJelly)
    v = h * (1 - s') + v_reset * s'              # hard reset; s' = s detached (detach_reset=True)
Backward of the Heaviside is the sigmoid surrogate: alpha * sg * (1 - sg), sg = sigmoid(alpha * u).

The whole T-step loop is one autograd Function with a hand-written BPTT backward: the forward
runs four element-wise kernels per step in preallocated buffers and keeps only the membrane
potentials and the spikes, instead of the dozen autograd nodes per step a transcription of
SpikingJelly would record.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .surrogate import heaviside_sigmoid

# Set by plain_ops(): LIF runs as plain tensor ops (for exporters such as torch.onnx, which cannot
# trace the autograd Function below). Off, the training / inference path is untouched.
_PLAIN_OPS = False


class _MultiStepLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tau: float, v_threshold: float, alpha: float):
        # Every step runs 4 element-wise kernels in preallocated buffers (this loop runs T times in
        # every layer, so it is most of the non-GEMM time). Spikes are written as floats straight
        # from the comparison, and the reset v = h - h * s is exact for s in {0, 1}; both are several
        # times cheaper on CPU than a bool mask with where/masked_fill. The charge multiplies by
        # 1/tau as SpikingJelly's CUDA kernel does; for tau = 2 it equals its torch path's division.
        keep = ctx.needs_input_grad[0]  # training: keep the membrane potentials for backward
        spikes = torch.empty_like(x, memory_format=torch.contiguous_format)
        hs = torch.empty_like(spikes) if keep else None
        v = torch.empty_like(spikes[0])  # membrane after reset
        dv = torch.empty_like(v)
        for t in range(x.shape[0]):
            h = hs[t] if keep else v  # without backward, charge v in place
            if t == 0:
                torch.mul(x[0], 1.0 / tau, out=h)  # v starts at v_reset = 0: h = x_0 / tau
            else:
                torch.sub(x[t], v, out=dv)
                torch.add(v, dv, alpha=1.0 / tau, out=h)  # h = v + (x_t - v) / tau
            torch.ge(h, v_threshold, out=spikes[t])  # Heaviside(h - threshold): h == threshold fires
            torch.addcmul(h, h, spikes[t], value=-1.0, out=v)  # hard reset to 0 where it fired
        if keep:
            ctx.save_for_backward(hs, spikes)
        ctx.consts = (tau, v_threshold, alpha)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        hs, spikes = ctx.saved_tensors
        tau, v_threshold, alpha = ctx.consts
        # dL/dh_t = dL/ds_t * surrogate'(h_t - threshold) + dL/dv_t * (1 - s_t); the first term for
        # all steps at once, then one backward sweep for the membrane carried through time.
        # surrogate'(u) = alpha * sg * (1 - sg), sg = sigmoid(alpha * u): in place in one buffer
        grad_h = torch.sub(hs, v_threshold).mul_(alpha).sigmoid_()
        grad_h.addcmul_(grad_h, grad_h, value=-1.0).mul_(grad_spikes).mul_(alpha)
        carry = torch.empty_like(grad_h[0])
        for t in range(hs.shape[0] - 1, -1, -1):
            if t < hs.shape[0] - 1:  # the reset is detached: dv_t/dh_t = 1 - s_t
                grad_h[t] += carry.addcmul_(carry, spikes[t], value=-1.0)
            torch.mul(grad_h[t], 1.0 - 1.0 / tau, out=carry)  # dh_t / dv_{t-1} = 1 - 1/tau
        return grad_h.div_(tau), None, None, None  # dh_t / dx_t = 1 / tau


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
        if _PLAIN_OPS:  # under plain_ops() (spikeprune.deploy); the default path is unchanged
            s = lif_plain_ops(x, self.tau, self.v_threshold)
        else:
            s = lif_multistep(x, self.tau, self.v_threshold, self.alpha)
        if self.record_rate:
            self.last_rate = s.detach().mean()
        return s

    def extra_repr(self) -> str:
        return f"tau={self.tau}, v_threshold={self.v_threshold}, surrogate=sigmoid(alpha={self.alpha})"


def lif_plain_ops(x: torch.Tensor, tau: float = 2.0, v_threshold: float = 1.0) -> torch.Tensor:
    """The forward of lif_multistep unrolled over T as plain element-wise tensor ops (no autograd
    Function, no in-place writes), which an exporter records as Mul / Sub / Add / GreaterOrEqual /
    Cast nodes. Same recurrence; h = v + (x_t - v) * (1/tau) is rounded in two steps here where
    lif_multistep's add(alpha=) may fuse them, so a membrane within one float rounding of the
    threshold can decide the other way (spikeprune.deploy counts such ties)."""
    inv_tau = 1.0 / tau
    out = []
    v = None
    for t in range(x.shape[0]):
        s, v = lif_plain_step(x[t], v, inv_tau, v_threshold)
        out.append(s)
    return torch.stack(out)


def lif_plain_step(x_t: torch.Tensor, v: torch.Tensor | None, inv_tau: float, v_threshold: float):
    """One time step of lif_plain_ops: (spikes, membrane after the reset) from the input x_t and the
    membrane v (None: at rest, v_reset = 0). The exported ONNX Loop's body runs this step."""
    h = x_t * inv_tau if v is None else v + (x_t - v) * inv_tau
    s = (h >= v_threshold).to(x_t.dtype)  # h == threshold fires, as lif_multistep
    return s, h - h * s  # hard reset to 0 where it fired


@contextmanager
def plain_ops():
    """Within this block every LIF runs lif_plain_ops (forward only): for exporters and checks."""
    global _PLAIN_OPS
    before, _PLAIN_OPS = _PLAIN_OPS, True
    try:
        yield
    finally:
        _PLAIN_OPS = before


def lif_reference_loop(x: torch.Tensor, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0,
                       v_reset: float = 0.0) -> torch.Tensor:
    """Plain autograd transcription of SpikingJelly's multi-step LIFNode (tests compare against it)."""
    v = torch.full_like(x[0], v_reset)
    out = []
    for t in range(x.shape[0]):
        h = v + (x[t] - (v - v_reset)) / tau
        s = heaviside_sigmoid(h - v_threshold, alpha)
        sd = s.detach()
        v = h * (1.0 - sd) + v_reset * sd
        out.append(s)
    return torch.stack(out)
