"""Spikformer (Zhou et al., ICLR 2023) in both reference layouts, with per-layer widths.

Read top to bottom: config, stem (SPS), attention (SSA), MLP, block, model, presets, and the
checkpoint filter that maps reference checkpoints onto ours.

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

import copy
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpikepruneError
from ..neuron import LIF
from . import register_model

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
        stride = 2 ** sum(self.pool_after)
        if self.img_size % stride:
            ok = [s for s in (28, 32, 64, 96, 128, 160, 192, 224, 256) if s % stride == 0]
            raise SpikepruneError(
                f"image size {self.img_size} cannot be taken: this {self.layout} stem pools "
                f"{sum(self.pool_after)} times, so the size must be a multiple of {stride} (e.g. {ok[:4]})")

    @property
    def num_tokens(self) -> int:
        side = self.img_size // 2 ** sum(self.pool_after)
        return side * side

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpikformerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpikepruneError(f"unknown Spikformer config fields: {unknown}")
        return cls(**copy.deepcopy(d))


def _pointwise(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A k=1 Conv1d/Conv2d or a Linear, applied to channel-last x [..., C_in] as one GEMM."""
    w = layer.weight
    # on a 2-D input the bias is fused into the GEMM (addmm); a 4-D input adds it in a second pass
    y = F.linear(x.reshape(-1, x.shape[-1]), w.view(w.shape[0], w.shape[1]), layer.bias)
    return y.view(*x.shape[:-1], w.shape[0])


def _batchnorm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the last dim of channel-last x; statistics over every other position."""
    return bn(x.reshape(-1, x.shape[-1])).view(x.shape)


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
        if images.dim() != 4 or images.shape[1] != self.cfg.in_channels:
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
    "spikformer-1-32-digits": dict(layout="cifar", img_size=16, in_channels=1, num_classes=10,
                                   embed_dim=32, depth=1, num_heads=2),
}


def _make(preset: str):
    def build(**overrides) -> Spikformer:
        cfg = dict(PRESETS[preset])
        cfg.update(overrides)
        return Spikformer(SpikformerConfig(**cfg))

    build.__doc__ = f"Spikformer preset {preset}: {PRESETS[preset]}"
    return build


for _name in PRESETS:
    register_model(_name, family="spikformer")(_make(_name))


def build_from_config(config: dict) -> Spikformer:
    return Spikformer(SpikformerConfig.from_dict(config))


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
    for wrapper in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = k[len("module."):] if k.startswith("module.") else k
        if _is_unused_norm(k):
            continue
        out[k] = v
    expected = model.state_dict()
    missing = [k for k in expected if k not in out]
    unexpected = [k for k in out if k not in expected]
    wrong = [(k, tuple(out[k].shape), tuple(expected[k].shape))
             for k in expected if k in out and out[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        lines = []
        if wrong:
            lines.append("shape mismatches (checkpoint vs model): " + "; ".join(
                f"{k} {list(a)} vs {list(b)}" for k, a, b in wrong[:5]))
        if missing:
            lines.append(f"missing from checkpoint ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            lines.append(f"not in the model ({len(unexpected)}): {', '.join(unexpected[:5])}")
        raise SpikepruneError(
            "checkpoint does not fit this model -- " + " | ".join(lines)
            + ". Check the preset (and overrides such as num_classes or img_size) matches the training run.")
    return out


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
