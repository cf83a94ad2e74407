"""Spikformer (Zhou et al., ICLR 2023) in both reference layouts, with per-layer widths.

Read top to bottom: config, stem (SPS), attention (SSA), MLP, block, model, presets, the
checkpoint filter that maps reference checkpoints onto ours, and what the engine needs to know
about the family (its coupled groups, resizer, staged forward and cost table), registered as one
Family object at the end.

Layouts (state-dict names and shapes equal the reference code's):
  imagenet: q/k/v/proj are Conv1d k=1, fc1/fc2 Conv2d 1x1, max-pool after every stem stage.
  cifar:    q/k/v/proj/fc1/fc2 are nn.Linear (with bias), max-pool after stem stages 3 and 4.
Internally both run the same code on channel-last tokens [T, B, N, C]: every k=1 conv and every
linear is one GEMM on the last dim, and every BatchNorm normalises over all T*B*N positions, which
is exactly what the reference's reshapes compute. Attention is q @ (k^T @ v) * 0.125 in both
layouts: on binary spikes the two association orders give bit-identical integer sums and the
0.125 scale is a power of two, so the cheaper order is always taken.

The reference builds norm1/norm2 LayerNorms per block that forward never calls. They are not built
here (they hold no function); reference checkpoints may carry them and load all the same, and
`reference_state_dict` adds identity ones back for the reference code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpikepruneError
from ..neuron import LIF
from ..structure import Group, Layer, Member, Probe
from .registry import Family, register_family, register_model
from .common import (EMA_WRAPPERS, WRAPPERS, StagedTransformer, batchnorm as _batchnorm, check_pooled_size, fit_state,
                     one_time_step, pointwise as _pointwise, pooled_tokens, preset_builders, strict_config, strip_module,
                     unwrap)

LAYOUTS = ("imagenet", "cifar")
STEM_STAGES = 4


@dataclass
class SpikformerConfig:
    layout: str = "cifar"  # "imagenet" or "cifar": layer types and where the stem pools
    img_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    embed_dim: int = 384  # D, the residual width
    depth: int = 4
    num_heads: int = 12
    mlp_ratio: float = 4.0
    T: int = 4  # time steps; the image is repeated T times
    attn_scale: float = 0.125  # fixed in the reference, whatever the head dim
    tau: float = 2.0
    v_threshold: float = 1.0
    attn_v_threshold: float = 0.5
    surrogate_alpha: float = 4.0
    # Per-layer widths. None means "the dense default"; __post_init__ fills them in, so a saved
    # config always spells them out. Pruning writes smaller values here.
    stem_widths: list[int] | None = None  # output widths of stem stages 1..3 (stage 4 gives D)
    pool_after: list[bool] | None = None  # per stem stage: max-pool(3, 2, 1) after it
    blocks: list[dict] | None = None  # per block: heads, qk_dim, v_dim, mlp_hidden

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise SpikepruneError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        D = self.embed_dim
        if self.stem_widths is None:
            self.stem_widths = [max(1, D // 8), max(1, D // 4), max(1, D // 2)]
        if self.pool_after is None:
            self.pool_after = [True] * 4 if self.layout == "imagenet" else [False, False, True, True]
        if self.blocks is None:
            hidden = int(D * self.mlp_ratio)
            self.blocks = [dict(heads=self.num_heads, qk_dim=D, v_dim=D, mlp_hidden=hidden) for _ in range(self.depth)]
        self.stem_widths = [int(w) for w in self.stem_widths]
        self.pool_after = [bool(p) for p in self.pool_after]
        self.blocks = [{k: int(b[k]) for k in ("heads", "qk_dim", "v_dim", "mlp_hidden")} for b in self.blocks]
        self.validate()

    def validate(self):
        if len(self.stem_widths) != STEM_STAGES - 1 or len(self.pool_after) != STEM_STAGES:
            raise SpikepruneError("stem_widths needs 3 entries and pool_after 4 (one per stem stage)")
        if len(self.blocks) != self.depth:
            raise SpikepruneError(f"config lists {len(self.blocks)} block widths for depth {self.depth}")
        for name, value in [("embed_dim", self.embed_dim), ("T", self.T), ("in_channels", self.in_channels),
                            ("num_classes", self.num_classes), ("img_size", self.img_size)]:
            if value < 1:
                raise SpikepruneError(f"{name} must be at least 1, got {value}")
        if min(self.stem_widths) < 1:
            raise SpikepruneError(f"every stem width must be at least 1, got {self.stem_widths}")
        for i, b in enumerate(self.blocks):
            if min(b.values()) < 1:
                raise SpikepruneError(f"block {i}: every width must be at least 1, got {b}")
            for key in ("qk_dim", "v_dim"):
                if b[key] % b["heads"]:
                    raise SpikepruneError(f"block {i}: {key}={b[key]} is not divisible by heads={b['heads']}")
        check_pooled_size(self.img_size, self.pool_after, f"{self.layout}")

    @property
    def num_tokens(self) -> int:
        return pooled_tokens(self.img_size, self.pool_after)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpikformerConfig":
        return strict_config(cls, d, "Spikformer")


def _pointwise_layer(layout: str, cin: int, cout: int, bias: bool, conv_dims: int) -> nn.Module:
    if layout == "cifar":
        return nn.Linear(cin, cout, bias=True)  # the CIFAR reference gives every Linear a bias
    conv = nn.Conv1d if conv_dims == 1 else nn.Conv2d
    return conv(cin, cout, kernel_size=1, stride=1, bias=bias)


class SPS(nn.Module):
    """Spiking patch splitting: 4 x (conv3x3 -> BN -> LIF [-> maxpool]), then x = rpe(x) + x."""

    def __init__(self, cfg: SpikformerConfig):
        super().__init__()
        self.T, self.pool_after = cfg.T, list(cfg.pool_after)
        cin = cfg.in_channels
        for i, w in enumerate([*cfg.stem_widths, cfg.embed_dim]):
            sfx = "" if i == 0 else str(i)  # reference names: proj_conv, proj_conv1, ...
            self.add_module(f"proj_conv{sfx}", nn.Conv2d(cin, w, 3, 1, 1, bias=False))
            self.add_module(f"proj_bn{sfx}", nn.BatchNorm2d(w))
            self.add_module(f"proj_lif{sfx}", LIF(cfg.tau, cfg.v_threshold, cfg.surrogate_alpha))
            cin = w
        D = cfg.embed_dim
        self.rpe_conv = nn.Conv2d(D, D, 3, 1, 1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(D)
        self.rpe_lif = LIF(cfg.tau, cfg.v_threshold, cfg.surrogate_alpha)

    def stage(self, i: int) -> tuple[nn.Conv2d, nn.BatchNorm2d, LIF]:
        sfx = "" if i == 0 else str(i)
        return getattr(self, f"proj_conv{sfx}"), getattr(self, f"proj_bn{sfx}"), getattr(self, f"proj_lif{sfx}")

    def forward_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stem stage i: conv3x3 -> BN -> LIF [-> max-pool]. Stage 0 takes the images [B, C, H, W];
        stages 0-2 return spikes [T*B, C, H, W]; stage 3 adds the rpe and returns tokens [T, B, N, D].
        (Split by stage so the sensitivity analysis can cache the input of any stage.)"""
        T = self.T
        conv, bn, lif = self.stage(i)
        if i == 0 and self.training:
            # Same ops as the reference (repeat, then conv/BN over T*B) so BN statistics match.
            x = bn(conv(x.repeat(T, 1, 1, 1)))
            x = x.view(T, -1, *x.shape[1:])
        elif i == 0:
            # Eval: the T copies are identical, so the first conv and BN run once.
            x = bn(conv(x))
            x = x.unsqueeze(0).expand(T, *x.shape)
        else:
            x = bn(conv(x))
            x = x.view(T, -1, *x.shape[1:])
        x = lif(x).flatten(0, 1)
        if self.pool_after[i]:
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        if i < STEM_STAGES - 1:
            return x
        feat = x
        x = self.rpe_bn(self.rpe_conv(x))
        x = self.rpe_lif(x.view(T, -1, *x.shape[1:])).flatten(0, 1) + feat
        # [T*B, D, H, W] -> channel-last tokens [T, B, N, D]
        return x.flatten(2).transpose(1, 2).reshape(T, -1, x.shape[2] * x.shape[3], x.shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> tokens [T, B, N, D]."""
        x = images
        for i in range(STEM_STAGES):
            x = self.forward_stage(i, x)
        return x


class SSA(nn.Module):
    """Spiking self-attention: q, k, v = LIF(BN(W x)); attn_lif(q (k^T v) * scale); proj."""

    def __init__(self, cfg: SpikformerConfig, widths: dict):
        super().__init__()
        D, L = cfg.embed_dim, cfg.layout
        self.kind = "conv" if L == "imagenet" else "linear"
        self.heads, self.qk_dim, self.v_dim = widths["heads"], widths["qk_dim"], widths["v_dim"]
        self.scale = cfg.attn_scale
        lif = lambda vth=cfg.v_threshold: LIF(cfg.tau, vth, cfg.surrogate_alpha)  # noqa: E731
        for name, cin, cout, bias in [("q", D, self.qk_dim, False), ("k", D, self.qk_dim, False),
                                      ("v", D, self.v_dim, False)]:
            self.add_module(f"{name}_{self.kind}", _pointwise_layer(L, cin, cout, bias, 1))
            self.add_module(f"{name}_bn", nn.BatchNorm1d(cout))
            self.add_module(f"{name}_lif", lif())
        self.attn_lif = lif(cfg.attn_v_threshold)
        self.add_module(f"proj_{self.kind}", _pointwise_layer(L, self.v_dim, D, True, 1))
        self.proj_bn = nn.BatchNorm1d(D)
        self.proj_lif = lif()

    def layer(self, name: str) -> nn.Module:
        """The q/k/v/proj weight layer, whatever the layout calls it (q_conv or q_linear)."""
        return getattr(self, f"{name}_{self.kind}")

    def _spikes(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"{name}_lif")(_batchnorm(getattr(self, f"{name}_bn"), _pointwise(self.layer(name), x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, N, _ = x.shape
        H = self.heads
        q = self._spikes("q", x).view(T, B, N, H, -1).transpose(2, 3)  # [T, B, H, N, d_qk]
        k = self._spikes("k", x).view(T, B, N, H, -1).transpose(2, 3)
        v = self._spikes("v", x).view(T, B, N, H, -1).transpose(2, 3)  # [T, B, H, N, d_v]
        # the scale goes on the small d x d product; with spikes and the reference's power-of-two
        # scale every value here is exact in float, so this equals (q @ k^T v) * scale bit for bit
        x = q @ ((k.transpose(-2, -1) @ v) * self.scale)
        x = self.attn_lif(x.transpose(2, 3).reshape(T, B, N, self.v_dim))
        return self.proj_lif(_batchnorm(self.proj_bn, _pointwise(self.layer("proj"), x)))


class MLP(nn.Module):
    """fc1 -> BN -> LIF -> fc2 -> BN -> LIF on tokens."""

    def __init__(self, cfg: SpikformerConfig, hidden: int):
        super().__init__()
        D, L = cfg.embed_dim, cfg.layout
        self.kind = "conv" if L == "imagenet" else "linear"
        self.hidden = hidden
        self.add_module(f"fc1_{self.kind}", _pointwise_layer(L, D, hidden, True, 2))
        self.fc1_bn = nn.BatchNorm1d(hidden)
        self.fc1_lif = LIF(cfg.tau, cfg.v_threshold, cfg.surrogate_alpha)
        self.add_module(f"fc2_{self.kind}", _pointwise_layer(L, hidden, D, True, 2))
        self.fc2_bn = nn.BatchNorm1d(D)
        self.fc2_lif = LIF(cfg.tau, cfg.v_threshold, cfg.surrogate_alpha)

    def layer(self, name: str) -> nn.Module:
        return getattr(self, f"{name}_{self.kind}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1_lif(_batchnorm(self.fc1_bn, _pointwise(self.layer("fc1"), x)))
        return self.fc2_lif(_batchnorm(self.fc2_bn, _pointwise(self.layer("fc2"), x)))


class Block(nn.Module):
    def __init__(self, cfg: SpikformerConfig, widths: dict):
        super().__init__()
        self.attn = SSA(cfg, widths)
        self.mlp = MLP(cfg, widths["mlp_hidden"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)  # sums of spikes: the residual stream is not binary
        return x + self.mlp(x)


class Spikformer(nn.Module):
    family = "spikformer"

    def __init__(self, cfg: SpikformerConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = SPS(cfg)
        self.block = nn.ModuleList(Block(cfg, w) for w in cfg.blocks)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> features [T, B, D] (token mean per time step)."""
        x = self.patch_embed(images)
        for blk in self.block:
            x = blk(x)
        return x.mean(2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> logits [B, classes], the mean over the T time steps."""
        c = self.cfg
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_channels, c.img_size, c.img_size):
            raise SpikepruneError(
                f"expected images [B, {self.cfg.in_channels}, {self.cfg.img_size}, {self.cfg.img_size}], "
                f"got {list(images.shape)}")
        return self.head(self.forward_features(images).mean(0))

    def config_dict(self) -> dict:
        return {"family": self.family, "config": self.cfg.to_dict()}


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
_IMAGENET = dict(layout="imagenet", img_size=224, in_channels=3, num_classes=1000)
_CIFAR = dict(layout="cifar", img_size=32, in_channels=3, num_classes=10)
_MNIST = dict(layout="cifar", img_size=28, in_channels=1, num_classes=10)

PRESETS: dict[str, dict] = {
    "spikformer-8-384": dict(_IMAGENET, embed_dim=384, depth=8, num_heads=12),
    "spikformer-8-512": dict(_IMAGENET, embed_dim=512, depth=8, num_heads=8),
    "spikformer-10-512": dict(_IMAGENET, embed_dim=512, depth=10, num_heads=8),
    "spikformer-8-768": dict(_IMAGENET, embed_dim=768, depth=8, num_heads=12),
    "spikformer-4-384": dict(_CIFAR, embed_dim=384, depth=4, num_heads=12),
    # Sized for the bundled data (28x28 MNIST digits; the 8x8 scikit-learn digits resized to 16).
    "spikformer-2-128-mnist": dict(_MNIST, embed_dim=128, depth=2, num_heads=4),
    "spikformer-1-64-mnist": dict(_MNIST, embed_dim=64, depth=1, num_heads=4),
    "spikformer-2-128-fmnist": dict(_MNIST, embed_dim=128, depth=2, num_heads=4, T=2, pool_after=[True, False] * 2),
    "spikformer-1-32-digits": dict(layout="cifar", img_size=16, in_channels=1, num_classes=10,
                                   embed_dim=32, depth=1, num_heads=2),
}


for _name, _build in preset_builders(Spikformer, SpikformerConfig, PRESETS, "Spikformer").items():
    register_model(_name, family="spikformer")(_build)


# ---------------------------------------------------------------------------------------------
# Checkpoints from the reference training code
# ---------------------------------------------------------------------------------------------
def _is_unused_norm(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 3 and parts[0] == "block" and parts[2] in ("norm1", "norm2")


def checkpoint_filter_fn(state_dict: dict, model: Spikformer) -> dict:
    """Map a reference checkpoint onto our names: unwrap, strip `module.`, drop unused norms.

    Raises SpikepruneError naming the first mismatched keys and shapes if it does not fit.
    """
    inner = unwrap(state_dict, WRAPPERS + EMA_WRAPPERS)  # the reference saves no EMA; a fork's is taken
    state_dict = state_dict if inner is None else inner
    out = {k: v for k, v in strip_module(state_dict).items() if not _is_unused_norm(k)}
    return fit_state(out, model, "Spikformer")


def reference_state_dict(model: Spikformer) -> dict:
    """Our state dict plus identity norm1/norm2 LayerNorms, loadable strictly by the reference code."""
    sd = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if parts[0] == "block" and parts[2] == "attn" and parts[3].startswith("q_") and parts[4] == "weight":
            sd[f"block.{parts[1]}.norm1.weight"] = torch.ones(model.cfg.embed_dim)
            sd[f"block.{parts[1]}.norm1.bias"] = torch.zeros(model.cfg.embed_dim)
        if parts[0] == "block" and parts[2] == "mlp" and parts[3].startswith("fc1_") and parts[4] == "weight":
            sd[f"block.{parts[1]}.norm2.weight"] = torch.ones(model.cfg.embed_dim)
            sd[f"block.{parts[1]}.norm2.bias"] = torch.zeros(model.cfg.embed_dim)
        sd[k] = v
    return sd


# ---------------------------------------------------------------------------------------------
# What the engine needs to know about the family
# ---------------------------------------------------------------------------------------------
# Coupled groups (spikeprune.coupling explains groups; both layouts differ only in the q/k/v/proj/
# fc1/fc2 module suffix, _conv or _linear). Names a user can map to the state dict: a stem group
# is named after the conv whose output channels it cuts (stem.proj_conv1 = the outputs of
# patch_embed.proj_conv1, its BN, and the inputs of proj_conv2); the last stem conv's outputs are
# the residual width.
def _stem_names(i: int) -> tuple[str, str]:
    sfx = "" if i == 0 else str(i)
    return f"patch_embed.proj_conv{sfx}", f"patch_embed.proj_bn{sfx}"


def stem_group_name(i: int) -> str:
    """The group cutting the output channels of stem conv i (0-based; i < STEM_STAGES - 1)."""
    return "stem." + _stem_names(i)[0].split(".")[1]


def spikformer_groups(model: Spikformer) -> list[Group]:
    cfg = model.cfg
    out: list[Group] = []
    for i in range(STEM_STAGES - 1):  # stem convs 0..2: outputs + BN, the next conv's inputs
        conv, bn = _stem_names(i)
        nxt, _ = _stem_names(i + 1)
        out.append(Group(
            name=stem_group_name(i), kind="stem", unit="channel", size=cfg.stem_widths[i],
            members=[Member(conv, 0), Member(bn, 0), Member(nxt, 1)],
            probes=[Probe(nxt, "input", 1, (nxt,))]))  # conv input = LIF spikes after pooling

    # Residual: every writer of the stream (the last stem conv, rpe, each proj and fc2, with their
    # BNs) on its output channels, every reader (rpe, q, k, v, fc1, head) on its input channels.
    conv3, bn3 = _stem_names(STEM_STAGES - 1)
    res = [Member(conv3, 0), Member(bn3, 0),
           Member("patch_embed.rpe_conv", 1), Member("patch_embed.rpe_conv", 0), Member("patch_embed.rpe_bn", 0)]
    probes = [Probe("patch_embed.rpe_conv", "input", 1, ("patch_embed.rpe_conv",))]
    for i, blk in enumerate(model.block):
        a, m = f"block.{i}.attn", f"block.{i}.mlp"
        ak, mk = blk.attn.kind, blk.mlp.kind
        res += [Member(f"{a}.q_{ak}", 1), Member(f"{a}.k_{ak}", 1), Member(f"{a}.v_{ak}", 1),
                Member(f"{a}.proj_{ak}", 0), Member(f"{a}.proj_bn", 0),
                Member(f"{m}.fc1_{mk}", 1), Member(f"{m}.fc2_{mk}", 0), Member(f"{m}.fc2_bn", 0)]
        probes += [Probe(a, "input", -1, (f"{a}.q_{ak}", f"{a}.k_{ak}", f"{a}.v_{ak}")),
                   Probe(m, "input", -1, (f"{m}.fc1_{mk}",))]
    res.append(Member("head", 1))
    probes.append(Probe("head", "input", -1, ("head",)))
    out.append(Group(name="residual", kind="residual", unit="channel", size=cfg.embed_dim,
                     members=res, probes=probes))

    for i, blk in enumerate(model.block):
        a, m = f"block.{i}.attn", f"block.{i}.mlp"
        ak, mk = blk.attn.kind, blk.mlp.kind
        H, qk, v = blk.attn.heads, blk.attn.qk_dim, blk.attn.v_dim
        dqk, dv = qk // H, v // H
        q_, k_, v_, proj = f"{a}.q_{ak}", f"{a}.k_{ak}", f"{a}.v_{ak}", f"{a}.proj_{ak}"
        heads = f"block{i}.attn.heads"
        out.append(Group(
            name=f"block{i}.attn.qk", kind="qk", unit="channel", size=qk, heads=H, head_group=heads,
            members=[Member(q_, 0), Member(f"{a}.q_bn", 0), Member(k_, 0), Member(f"{a}.k_bn", 0)],
            probes=[Probe(f"{a}.q_lif", "output", -1), Probe(f"{a}.k_lif", "output", -1)],
            probe_reduce="prod"))
        # v channel c only ever reaches attention-output channel c (attention mixes tokens, not
        # channels), so what proj reads on column c is attn_lif's channel c.
        out.append(Group(
            name=f"block{i}.attn.v", kind="v", unit="channel", size=v, heads=H, head_group=heads,
            members=[Member(v_, 0), Member(f"{a}.v_bn", 0), Member(proj, 1)],
            probes=[Probe(f"{a}.attn_lif", "output", -1, (proj,))]))
        out.append(Group(
            name=heads, kind="heads", unit="head", size=H,
            members=[Member(q_, 0, dqk), Member(f"{a}.q_bn", 0, dqk), Member(k_, 0, dqk),
                     Member(f"{a}.k_bn", 0, dqk), Member(v_, 0, dv), Member(f"{a}.v_bn", 0, dv),
                     Member(proj, 1, dv)],
            probes=[Probe(f"{a}.attn_lif", "output", -1, (proj,), dv)]))
        out.append(Group(
            name=f"block{i}.mlp.hidden", kind="hidden", unit="channel", size=blk.mlp.hidden,
            members=[Member(f"{m}.fc1_{mk}", 0), Member(f"{m}.fc1_bn", 0), Member(f"{m}.fc2_{mk}", 1)],
            probes=[Probe(f"{m}.fc1_lif", "output", -1, (f"{m}.fc2_{mk}",))]))
    return out


def spikformer_resize(model: Spikformer, kept: dict[str, int]) -> Spikformer:
    """A Spikformer with the kept unit counts (qk / v counts are the channels that remain, in the
    kept heads)."""
    cfg = model.cfg.to_dict()
    cfg["embed_dim"] = kept["residual"]
    cfg["stem_widths"] = [kept[stem_group_name(i)] for i in range(STEM_STAGES - 1)]
    for i, b in enumerate(cfg["blocks"]):
        b.update(heads=kept[f"block{i}.attn.heads"], qk_dim=kept[f"block{i}.attn.qk"],
                 v_dim=kept[f"block{i}.attn.v"], mlp_hidden=kept[f"block{i}.mlp.hidden"])
    return Spikformer(SpikformerConfig.from_dict(cfg))


# The forward cut into stages (stem.3 = the last stem stage + rpe, giving tokens); the head takes the
# tokens [T, B, N, D], averages them over tokens, then over T.
STAGED = StagedTransformer(STEM_STAGES, lambda i: stem_group_name(i), lambda model, x: model.head(x.mean(2).mean(0)),
                           "a Spikformer")


def spikformer_layer_table(cfg: SpikformerConfig) -> list[Layer]:
    """Every weight layer (and each block's attention products) in forward order, with its cost
    (spikeprune.costs gives the rules: MACs per image over all T steps)."""
    T, D = cfg.T, cfg.embed_dim
    rows: list[Layer] = []
    side, cin = cfg.img_size, cfg.in_channels
    for i, w in enumerate([*cfg.stem_widths, D]):
        conv, bn = _stem_names(i)
        shape = (w, cin, 3, 3)
        rows.append(Layer(conv, "Conv2d", shape, False, bn, w, "image" if i == 0 else "spikes",
                          w * cin * 9 * side * side * T))
        if cfg.pool_after[i]:
            side = (side - 1) // 2 + 1  # MaxPool2d(3, stride 2, padding 1)
        cin = w
    N = side * side
    rows.append(Layer("patch_embed.rpe_conv", "Conv2d", (D, D, 3, 3), False, "patch_embed.rpe_bn", D, "spikes",
                      D * D * 9 * N * T))

    conv = cfg.layout == "imagenet"
    kind, k1, k2 = ("conv", (1,), (1, 1)) if conv else ("linear", (), ())
    t1, t2 = ("Conv1d", "Conv2d") if conv else ("Linear", "Linear")
    for b, w in enumerate(cfg.blocks):
        pre = f"block.{b}"
        qk, v, hidden, heads = w["qk_dim"], w["v_dim"], w["mlp_hidden"], w["heads"]

        def lin(name, cout, cin, bias, src, typ=t1, ks=k1, sub="attn"):
            # the CIFAR layout gives every Linear a bias; the ImageNet q/k/v convs have none
            return Layer(f"{pre}.{sub}.{name}_{kind}", typ, (cout, cin, *ks), bias or not conv,
                         f"{pre}.{sub}.{name}_bn", cout, src, cout * cin * N * T)

        rows += [lin("q", qk, D, False, "real"), lin("k", qk, D, False, "real"), lin("v", v, D, False, "real")]
        # every q spike adds one row of k^T v and every k spike one row of v: the q and k rates
        rows.append(Layer(f"{pre}.attn.matmul", "SpikeMatmul", (), False, None, 0, "spikes",
                          2 * N * (qk // heads) * (v // heads) * heads * T,
                          rate_from=(f"{pre}.attn.q_lif", f"{pre}.attn.k_lif")))
        rows.append(lin("proj", D, v, True, "spikes"))
        rows.append(lin("fc1", hidden, D, True, "real", t2, k2, sub="mlp"))
        rows.append(lin("fc2", D, hidden, True, "spikes", t2, k2, sub="mlp"))
    rows.append(Layer("head", "Linear", (cfg.num_classes, D), True, None, 0, "real", cfg.num_classes * D))
    return rows


def _recognizes(state: dict) -> bool:
    """A Spikformer checkpoint (any wrapping): an SPS stem conv, and SSA's q layer as only Spikformer
    has it: a Linear (CIFAR layout) or a Conv1d, whose weight is 3-D (ImageNet layout)."""
    for wrapper in WRAPPERS:
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    items = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    q = [v for k, v in items.items() if k.endswith(".attn.q_linear.weight")
         or (k.endswith(".attn.q_conv.weight") and getattr(v, "dim", lambda: 0)() == 3)]
    return bool(q) and any(k.startswith("patch_embed.proj_conv") for k in items)


def _describe(cfg: SpikformerConfig) -> str:
    return (f"{cfg.layout} layout, D={cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, "
            f"{cfg.in_channels}x{cfg.img_size}x{cfg.img_size}, {cfg.num_classes} classes, T={cfg.T}")


FAMILY = register_family(Family(
    name="spikformer", model_class=Spikformer, config_class=SpikformerConfig,
    groups=spikformer_groups, resize=spikformer_resize, layer_table=spikformer_layer_table,
    checkpoint_filter=checkpoint_filter_fn, stages=STAGED.stages, run_stage=STAGED.run_stage,
    first_stage=STAGED.first_stage, describe=_describe, recognizes=_recognizes, one_step=one_time_step,
    cost_notes=("norm1/norm2 LayerNorms of the reference code are never called by its forward: not built here, "
                "not counted",
                "MACs of attention, computed as q (k^T v): 2*N*d_qk*d_v per head and step; the head runs once on the "
                "time- and token-averaged features",
                "SOPs of attention: (rate_q + rate_k)/2 x MACs (each q spike adds a row of k^T v, each k spike a row "
                "of v)",
                "counted as MACs, not SOPs (input is not binary): the first conv (real-valued image), q/k/v and fc1 "
                "of every block (residual stream: sums of spike maps) and the head (averaged features)")))
