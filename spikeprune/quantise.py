"""Weight quantisation in PyTorch: the fake-quantised model an exported file is checked against,
and quantisation-aware fine-tuning.

    quantise_weights(w, "int4")       symmetric per output channel (spikeprune.precision), dequantised
    apply_plan(model, plan)           in place: every weight layer's weights on its plan's grid;
                                      model.weight_precision = plan (saved in config.json)
    with quantisation_aware(model, plan): ...   the forward sees quantised weights, the backward
                                      passes the gradient straight through (STE) to the fp32 weights

Only weights are quantised; biases stay fp32 (fp16 layers: weights and bias rounded to float16).
The LIF neurons and their surrogate gradients are untouched: spikes are binary already, and the
membrane potentials stay float32 (quantising them would need a fixed-point membrane with its own
threshold scale, out of scope here).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .errors import SpikepruneError
from .precision import PLAN_ATTRIBUTE, QMAX, resolve_plan, weight_layers


def quantise_weights(w: torch.Tensor, precision: str) -> torch.Tensor:
    """`w` rounded to `precision` and back to its dtype: int8 / int4 symmetric per output channel
    (axis 0; scale = max|w| / QMAX, 1 for an all-zero channel), fp16 by a float16 round trip,
    fp32 unchanged. The arithmetic is float64, as the exporter's."""
    if precision == "fp32":
        return w
    if precision == "fp16":
        return w.to(torch.float16).to(w.dtype)
    if precision not in QMAX:
        raise SpikepruneError(f"unknown weight precision {precision!r}")
    q = QMAX[precision]
    wd = w.detach().double()
    peak = wd.reshape(wd.shape[0], -1).abs().amax(1)
    scale = torch.where(peak > 0, peak / q, torch.ones_like(peak)).float().double()  # stored as float32
    scale = scale.view(-1, *[1] * (w.dim() - 1))
    return (torch.clamp(torch.round(wd / scale), -q, q) * scale).to(w.dtype)


def _modules_of(model: nn.Module, plan: dict[str, str]) -> list[tuple[nn.Module, str]]:
    modules = dict(model.named_modules())
    missing = [n for n in plan if n not in modules or not isinstance(getattr(modules[n], "weight", None), torch.Tensor)]
    if missing:
        raise SpikepruneError(f"the precision plan names {missing[0]}, which is not a weight layer of the model")
    return [(modules[n], p) for n, p in plan.items()]


def apply_plan(model: nn.Module, precision="int8", ends: str | None = None) -> nn.Module:
    """Put every weight layer's weights (fp16: and bias) on the grid of its precision, in place,
    and record the plan on the model (`model.weight_precision`). Returns the model."""
    plan = resolve_plan(model, precision, ends) if not _is_full_plan(model, precision, ends) else dict(precision)
    with torch.no_grad():
        for module, p in _modules_of(model, plan):
            module.weight.copy_(quantise_weights(module.weight, p))
            if p == "fp16" and module.bias is not None:
                module.bias.copy_(quantise_weights(module.bias, "fp16"))
    setattr(model, PLAN_ATTRIBUTE, plan)
    return model


def _is_full_plan(model, precision, ends) -> bool:
    if not isinstance(precision, dict) or ends is not None:
        return False
    return set(precision) == {r.name for r in weight_layers(model)}


class _StraightThrough:
    """Quantisation-aware training through hooks, so the state dict, the optimiser and checkpoints
    keep the plain fp32 weights: before each forward of the model the fp32 weights are set aside
    and the weights put on their grid (however the forward then reads them: a module call or a
    GEMM on a view); forward and backward run at the quantised weights; once a weight's gradient
    has accumulated (or right after a forward without gradients) its fp32 value is put back, and
    the optimiser applies the gradient to it (the straight-through estimator)."""

    def __init__(self, model: nn.Module, layers: list[tuple[nn.Module, str]]):
        self.layers = layers
        self.master: dict[int, torch.Tensor] = {}
        self.hooks = [model.register_forward_pre_hook(self.before), model.register_forward_hook(self.after)]
        for i, (module, _) in enumerate(layers):
            self.hooks.append(module.weight.register_post_accumulate_grad_hook(lambda _p, i=i: self.restore(i)))

    def before(self, model, args):
        for i, (module, p) in enumerate(self.layers):
            if i not in self.master:  # a weight whose gradient never came stays set aside, not re-rounded
                self.master[i] = module.weight.data.clone()
                module.weight.data.copy_(quantise_weights(self.master[i], p))

    def after(self, model, args, out):
        if not (torch.is_grad_enabled() and model.training):
            for i in list(self.master):
                self.restore(i)  # no backward will follow

    def restore(self, i: int):
        w = self.master.pop(i, None)
        if w is not None:
            self.layers[i][0].weight.data.copy_(w)

    def remove(self):
        for i in list(self.master):
            self.restore(i)
        for h in self.hooks:
            h.remove()


@contextmanager
def quantisation_aware(model: nn.Module, precision="int8", ends: str | None = None):
    """Within the block the model's weight layers compute with quantised weights and train their
    fp32 weights through a straight-through estimator (the LIF surrogate gradients are unchanged).
    On leaving normally, the weights are put on the grid (apply_plan), so the model is the
    fake-quantised model the export writes; on an error they are left as fp32 weights."""
    plan = dict(precision) if _is_full_plan(model, precision, ends) else resolve_plan(model, precision, ends)
    ste = _StraightThrough(model, [(module, p) for module, p in _modules_of(model, plan) if p != "fp32"])
    try:
        yield plan
    finally:
        ste.remove()
    apply_plan(model, plan)
