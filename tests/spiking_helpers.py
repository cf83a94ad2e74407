"""Shared by the pruning-engine tests: random Spikformer weights that keep every layer spiking."""
from __future__ import annotations

import torch


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights, BatchNorm statistics measured on random images (so every BN sees roughly
    centred inputs, as in a trained model) and random BN scales / shifts: input-dependent spiking
    in every layer, some channels firing on their own (shift > 1)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
        was = model.training
        model.train()
        c = model.cfg
        model(torch.randn(8, c.in_channels, c.img_size, c.img_size, generator=g).to(next(model.parameters()).dtype))
        model.train(was)
        qkv = {id(getattr(b.attn, f"{n}_bn")) for b in model.block for n in "qkv"}
        for m in bns:
            m.momentum = 0.1
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            # q, k, v fire more (shift 0.5..2.5) so that on a handful of tokens the attention
            # product q (k^T v) is often nonzero and attn_lif fires: v / heads groups then matter.
            lo = 0.5 if id(m) in qkv else -1.0
            m.bias.copy_(torch.rand(n, generator=g) * 2.0 + lo)
    return model


def spike_rates(model: torch.nn.Module, images: torch.Tensor) -> dict:
    """Mean output of every spiking neuron module (ours: `LIF`; the reference transcription's:
    `MultiStepLIFNode`), by module name, after one forward without gradients."""
    from spikeprune.neuron import LIF
    from spikeprune.testing.reference_spikformer import MultiStepLIFNode

    rates, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (LIF, MultiStepLIFNode)):
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: rates.__setitem__(name, o.mean().item())))
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return rates
