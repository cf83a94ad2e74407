"""SpikingJelly 2.0's model zoo at tiny widths: third-party spiking transformers for the tracer's tests
and for bench/trace_compare.py. Each builder returns the zoo's own module (its code unchanged, its
weights drawn so that every layer spikes: `make_lively`), sized for the bundled 16x16 grey `digits`
(1 channel, 10 classes) and a handful of images, so a forward takes milliseconds. docs/tracing-zoo.md describes each model's forward patterns.

SpikingJelly is optional (the Makefile installs it with --no-deps; see ZOO_PACKAGES there):
`zoo_unavailable()` says why it cannot be imported, or None.
"""
from __future__ import annotations

import torch
from torch import nn

# What every builder here is sized for: the bundled `digits` data set.
IN_CHANNELS, IMAGE_SIZE, NUM_CLASSES = 1, 16, 10


def zoo_unavailable() -> str | None:
    """None when SpikingJelly's zoo imports; otherwise a one-line reason (for pytest.skip)."""
    try:
        import spikingjelly.activation_based.model.maxformer  # noqa: F401
        import spikingjelly.activation_based.model.qkformer  # noqa: F401
        import spikingjelly.activation_based.model.spike_driven_transformer  # noqa: F401
        import spikingjelly.activation_based.model.spikformer  # noqa: F401
    except Exception as e:  # ImportError, or a dependency that fails to load beside the CPU torch
        return (f"SpikingJelly's model zoo is not importable ({type(e).__name__}: {e}); `make install` "
                "installs spikingjelly==2.0.0 with --no-deps and the two packages its zoo imports")
    return None


def make_lively(model: nn.Module, seed: int, image_shape: tuple[int, int, int] = (IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
                ) -> nn.Module:
    """The zoo's initial weights (std 0.02) leave every neuron silent on random images, so the logits
    are all zero and a wrong cut would go unseen. Random weights of unit gain, BatchNorm statistics
    measured on random images, and random BatchNorm scales and shifts make every layer spike,
    depending on the input (what a trained model does)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the one pass below
        model.train()
        reset_states(model)
        model(torch.randn(8, *image_shape, generator=g))
        reset_states(model)
        for m in bns:
            m.momentum = 0.1
            m.weight.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.bias.copy_(torch.rand(m.num_features, generator=g) * 1.5)
    return model.eval()


class MeanOverTime(nn.Module):
    """The zoo's Spikformer returns one logit row per time step, [T, N, classes]; the others average
    over T themselves. A user evaluating it wraps it like this."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).mean(0)


def zoo_spikformer(T: int = 2, seed: int = 0) -> nn.Module:
    """Spikformer: 4-stage conv stem (4, 8, 16, 32 channels; patch 4: the last two stages pool), one
    block of D=32, 2 heads, MLP 64, 4x4 tokens; Conv1d q/k/v in ONE conv (3*D outputs)."""
    from spikingjelly.activation_based.model.spikformer import Spikformer

    torch.manual_seed(seed)
    model = Spikformer(T=T, in_channels=IN_CHANNELS, img_size_h=IMAGE_SIZE, img_size_w=IMAGE_SIZE, patch_size=4,
                       num_classes=NUM_CLASSES, embed_dims=32, num_heads=2, mlp_ratio=2.0, depths=1)
    return make_lively(MeanOverTime(model), seed)


def zoo_qkformer(T: int = 2, seed: int = 0) -> nn.Module:
    """QKFormer: three stages of widths 8, 16, 32 (patch-embedding stages with conv shortcuts between
    them), one block each; stages 1-2 use token Q-K attention (q and k in one conv), stage 3 Spikformer's
    self-attention; heads (1, 2, 2), MLP ratio 2. A 16x16 image leaves 1x1 tokens at stage 3."""
    from spikingjelly.activation_based.model.qkformer import QKFormer

    torch.manual_seed(seed)
    return make_lively(QKFormer(T=T, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, embed_dims=32,
                                num_heads=(1, 2, 2), depths=(1, 1, 1), mlp_ratio=2.0), seed)


def zoo_sdt(T: int = 2, seed: int = 0) -> nn.Module:
    """Spike-driven Transformer (v1): conv stem (4, 8, 16, 32 channels; pooling '0011': 4x4 tokens),
    one block of D=32, 2 heads, MLP 64; separate q/k/v Conv2d, attention q * LIF(sum_tokens(k * v))."""
    from spikingjelly.activation_based.model.spike_driven_transformer import SpikeDrivenTransformer

    torch.manual_seed(seed)
    return make_lively(SpikeDrivenTransformer(T=T, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, embed_dims=32,
                                              num_heads=2, depths=1, mlp_ratio=2.0, pooling_stat="0011"), seed)


def zoo_maxformer(T: int = 2, seed: int = 0) -> nn.Module:
    """MaxFormer (the ImageNet layout, cifar=False): widths 32, 64, 128; stage 1-2 depthwise-conv
    blocks (7x7, 5x5) with spatial MLPs, stage 3 one Spikformer self-attention block with
    128 // 64 = 2 heads (the zoo fixes heads = dim // 64); MLP ratio 2; 1x1 tokens at stage 3."""
    from spikingjelly.activation_based.model.maxformer import MaxFormer

    torch.manual_seed(seed)
    return make_lively(MaxFormer(T=T, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, embed_dims=128,
                                 depths=(1, 1, 1), mlp_ratio=2.0), seed)


# name -> builder; the order the tests and the benchmark report them in.
ZOO_BUILDERS = {
    "zoo-spikformer": zoo_spikformer,
    "zoo-qkformer": zoo_qkformer,
    "zoo-sdt": zoo_sdt,
    "zoo-maxformer": zoo_maxformer,
}


def example_input(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A [batch, 1, 16, 16] image batch in the range of normalized `digits`."""
    return torch.randn(batch, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def reset_states(model: nn.Module) -> None:
    """SpikingJelly neurons keep their membrane potential between calls; every forward on a fresh
    input starts from reset ones (the walk SpikingJelly's functional.reset_net does)."""
    for m in model.modules():
        if type(m).__module__.startswith("spikingjelly") and callable(getattr(m, "reset", None)):
            m.reset()


# -- the masked dense model, written here independently of spikeprune's own proof -------------------

def masked_dense(dense: nn.Module, cuts: list[tuple[str, int, list[int]]]) -> nn.Module:
    """A float64 copy of `dense` with the listed slices zeroed: (module path, 0 = the output
    channels it writes (weight rows, bias, BatchNorm affine) or 1 = the input channels it reads
    (weight columns), channel indices against the dense model). A correctly pruned model computes
    what this one computes."""
    import copy

    m = copy.deepcopy(dense).double()
    with torch.no_grad():
        for path, dim, idxs in cuts:
            if not idxs:
                continue
            layer = m.get_submodule(path)
            index = torch.tensor(sorted(set(idxs)), dtype=torch.long)
            weight = getattr(layer, "weight", None)
            if dim == 0:
                if weight is not None:
                    weight[index] = 0
                if getattr(layer, "bias", None) is not None:
                    layer.bias[index] = 0
            elif weight is not None and getattr(layer, "groups", 1) == 1:
                weight[:, index] = 0  # a depthwise conv's inputs are its outputs: cut with dim 0
    return m


def record_cuts(groups, record) -> list[tuple[str, int, list[int]]]:
    """The slices a pruning record removed, from the dense model's groups: unit u of a member with
    unit width w is its channels u*w .. u*w + w - 1."""
    cuts = []
    for g in groups:
        gone = sorted(set(range(g.size)) - set(record.kept_units(g.name)))
        for m in g.members:
            cuts.append((m.module, m.dim, [u * m.unit_width + j for u in gone for j in range(m.unit_width)]))
    return cuts
