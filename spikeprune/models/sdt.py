"""The Spike-driven Transformer (SDT; Yao et al., NeurIPS 2023), with per-layer widths.

Read top to bottom: config, neurons (the PLIF option), stem (MS_SPS), attention (SDSA), MLP,
block, model, presets, the checkpoint filter for the reference training code's files, and what
the engine needs to know about the family (coupled groups, resizer, staged forward, cost table),
registered as one Family object at the end. The facts followed are those of the project's SDT spec
(sdt.md: forward pass, neurons, coupling, presets, checkpoint format), read from the reference code.

State-dict names and shapes equal the reference code's (BICLab/Spike-Driven-Transformer). How it
differs from Spikformer, and what that means here:
  * The residual stream is real-valued ("membrane shortcut"): every branch starts with a LIF, so
    every conv after the stem's first reads spikes.
  * Attention works channel by channel: out = q * LIF_0.5(sum over tokens of k * v). q, k, v and
    proj's input share one index set (one group, `blockN.attn.qkv`), any channel may go, and heads
    only reshape. The reference reshapes with the residual width; here the attention width is
    free (`attn_dim` per block), so a pruned model need not keep it equal to D.
  * The MLP adds an inner residual when its hidden width equals its input width at construction;
    that choice is `mlp_residual` in each block's config, never re-derived from widths, and when it
    is on the hidden channels are the residual's channels (the residual group cuts them).
  * `talking_heads` (a Conv1d over heads), `attn_lif` and `rpe_lif` are built by the reference and
    never called: here too (so checkpoints load strictly), never called, and counted separately
    (`dead_params`); the cost table lists talking_heads as an unused row with no MACs.
Internally blocks run on channel-last tokens [T, B, N, C]: each 1x1 conv is one GEMM on the last
dim and each BatchNorm normalises over all T*B*N positions, as the reference's reshapes compute.
Not implemented: the DVS mode (Erode pooling; CIFAR10-DVS only), event input [B, T, C, H, W] and the TET
output [T, B, classes]; the reference's `hook` argument (firing-rate capture) is what measure does here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint_io import read_checkpoint
from ..errors import SpikepruneError
from ..neuron import LIF
from ..structure import Group, Layer, Member, Probe
from ..surrogate import heaviside_sigmoid
from .registry import Family, register_family, register_model
from .common import (EMA_WRAPPERS, WRAPPERS, StagedTransformer, batchnorm as _batchnorm, check_pooled_size, fit_state,
                     one_time_step, pointwise as _pointwise, pooled_tokens, preset_builders, strict_config, strip_module,
                     unwrap)

SPIKE_MODES = ("lif", "plif")
STEM_STAGES = 4
BLOCK_KEYS = ("heads", "attn_dim", "mlp_hidden", "mlp_residual")


@dataclass
class SDTConfig:
    img_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    embed_dim: int = 512  # D, the residual width
    depth: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0
    T: int = 4  # time steps; the image is repeated T times
    spike_mode: str = "lif"  # "lif", or "plif": one learnable leak per neuron module
    tau: float = 2.0  # LIF time constant (PLIF: its initial value)
    v_threshold: float = 1.0
    kv_v_threshold: float = 0.5  # talking_heads_lif (and the unused attn_lif)
    surrogate_alpha: float = 4.0
    # Per-layer widths. None means "the dense default"; __post_init__ fills them in, so a saved
    # config always spells them out. Pruning writes smaller values here.
    stem_widths: list[int] | None = None  # output widths of stem stages 0..2 (stage 3 gives D)
    pool_after: list[bool] | None = None  # the reference's pooling_stat: max-pool(3, 2, 1) per stem stage
    # per block: heads (only the dead talking_heads' shape depends on it), attn_dim (the q/k/v
    # width), mlp_hidden, mlp_residual (the MLP's inner residual, fixed when the dense model was built)
    blocks: list[dict] | None = None

    def __post_init__(self):
        if self.spike_mode not in SPIKE_MODES:
            raise SpikepruneError(f"unknown spike_mode {self.spike_mode!r}; choose one of {', '.join(SPIKE_MODES)} "
                                  "(the reference's alif/blif build no working model)")
        D = self.embed_dim
        if self.stem_widths is None:
            self.stem_widths = [max(1, D // 8), max(1, D // 4), max(1, D // 2)]
        if self.pool_after is None:
            self.pool_after = [False, False, True, True]
        if isinstance(self.pool_after, str):  # the reference's "0011"
            if len(self.pool_after) != STEM_STAGES or set(self.pool_after) - {"0", "1"}:
                raise SpikepruneError(f"pooling_stat {self.pool_after!r} needs 4 characters, each 0 or 1")
            self.pool_after = [c == "1" for c in self.pool_after]
        if self.blocks is None:
            hidden = int(D * self.mlp_ratio)
            # the reference's rule (in_features == hidden_features), applied once, here
            self.blocks = [dict(heads=self.num_heads, attn_dim=D, mlp_hidden=hidden, mlp_residual=hidden == D)
                           for _ in range(self.depth)]
        self.stem_widths = [int(w) for w in self.stem_widths]
        self.pool_after = [bool(p) for p in self.pool_after]
        blocks = []
        for i, b in enumerate(self.blocks):
            if not isinstance(b, dict) or set(b) != set(BLOCK_KEYS):
                got = sorted(b) if isinstance(b, dict) else type(b).__name__
                raise SpikepruneError(f"SDT block {i} config needs exactly {', '.join(BLOCK_KEYS)}; got {got}")
            blocks.append({"heads": int(b["heads"]), "attn_dim": int(b["attn_dim"]), "mlp_hidden": int(b["mlp_hidden"]),
                           "mlp_residual": bool(b["mlp_residual"])})
        self.blocks = blocks
        self.validate()

    def validate(self):
        if len(self.stem_widths) != STEM_STAGES - 1 or len(self.pool_after) != STEM_STAGES:
            raise SpikepruneError("stem_widths needs 3 entries and pool_after 4 (one per stem stage)")
        if len(self.blocks) != self.depth:
            raise SpikepruneError(f"config lists {len(self.blocks)} block widths for depth {self.depth}")
        for name, value in [("embed_dim", self.embed_dim), ("T", self.T), ("in_channels", self.in_channels),
                            ("num_classes", self.num_classes), ("img_size", self.img_size),
                            ("num_heads", self.num_heads)]:
            if value < 1:
                raise SpikepruneError(f"{name} must be at least 1, got {value}")
        if self.tau <= 1.0 and self.spike_mode == "plif":
            raise SpikepruneError(f"plif needs tau above 1 (its leak starts at 1/tau, w = -log(tau - 1)), got {self.tau}")
        if self.tau <= 0.0:
            raise SpikepruneError(f"tau must be positive, got {self.tau}")
        if min(self.stem_widths) < 1:
            raise SpikepruneError(f"every stem width must be at least 1, got {self.stem_widths}")
        for i, b in enumerate(self.blocks):
            if min(b["heads"], b["attn_dim"], b["mlp_hidden"]) < 1:
                raise SpikepruneError(f"block {i}: every width must be at least 1, got {b}")
            if b["mlp_residual"] and b["mlp_hidden"] != self.embed_dim:
                raise SpikepruneError(f"block {i}: the MLP's inner residual adds the hidden activations to the "
                                      f"residual stream, so mlp_hidden ({b['mlp_hidden']}) must equal embed_dim "
                                      f"({self.embed_dim})")
        check_pooled_size(self.img_size, self.pool_after, "SDT")

    @property
    def num_tokens(self) -> int:
        return pooled_tokens(self.img_size, self.pool_after)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SDTConfig":
        return strict_config(cls, d, "SDT")


# ---------------------------------------------------------------------------------------------
# Neurons
# ---------------------------------------------------------------------------------------------
class PLIF(nn.Module):
    """Multi-step parametric LIF (SpikingJelly's MultiStepParametricLIFNode as the reference builds
    it): the leak 1/tau = sigmoid(w) is one learnable scalar per module, w starting at
    -log(init_tau - 1). Otherwise as LIF: decay_input, hard reset to 0, detached reset, h >= threshold
    fires, sigmoid surrogate. A plain autograd loop (the gradient reaches w through every step)."""

    bias = None  # the cost table lists w as this module's one-entry weight (see `weight`)

    def __init__(self, init_tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))
        self.v_threshold, self.alpha = float(v_threshold), float(alpha)
        self.record_rate = False
        self.last_rate: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.w.view(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leak = self.w.sigmoid()
        v = torch.zeros_like(x[0])
        out = []
        for t in range(x.shape[0]):
            h = v + (x[t] - v) * leak
            s = heaviside_sigmoid(h - self.v_threshold, self.alpha)
            v = h * (1.0 - s.detach())
            out.append(s)
        s = torch.stack(out)
        if self.record_rate:
            self.last_rate = s.detach().mean()
        return s

    def extra_repr(self) -> str:
        return f"v_threshold={self.v_threshold}, surrogate=sigmoid(alpha={self.alpha})"


def _neuron(cfg: SDTConfig, v_threshold: float | None = None) -> nn.Module:
    vth = cfg.v_threshold if v_threshold is None else v_threshold
    if cfg.spike_mode == "plif":
        return PLIF(cfg.tau, vth, cfg.surrogate_alpha)
    return LIF(cfg.tau, vth, cfg.surrogate_alpha)


def _neuron_names(depth: int) -> list[str]:
    """Every neuron module the reference builds (PLIF gives each a `w`), in state-dict order."""
    names = [f"patch_embed.proj_lif{'' if i == 0 else i}" for i in range(STEM_STAGES)] + ["patch_embed.rpe_lif"]
    for b in range(depth):
        names += [f"block.{b}.attn.{n}" for n in ("q_lif", "k_lif", "v_lif", "attn_lif", "talking_heads_lif",
                                                  "shortcut_lif")]
        names += [f"block.{b}.mlp.fc1_lif", f"block.{b}.mlp.fc2_lif"]
    return names + ["head_lif"]


# ---------------------------------------------------------------------------------------------
# Layers on channel-last tokens
# ---------------------------------------------------------------------------------------------
def _init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The reference's _init_weights for Conv2d: truncated normal (std 0.02, cut at +-2), bias 0."""
    nn.init.trunc_normal_(conv.weight, mean=0.0, std=0.02, a=-2.0, b=2.0)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class SPS(nn.Module):
    """MS_SPS: stages 0-2 conv3x3 -> BN -> LIF [-> maxpool]; stage 3 conv3x3 -> BN [-> maxpool]
    (real-valued x_feat); then x_feat + rpe_bn(rpe_conv(proj_lif3(x_feat)))."""

    def __init__(self, cfg: SDTConfig):
        super().__init__()
        self.T, self.pool_after = cfg.T, list(cfg.pool_after)
        cin = cfg.in_channels
        for i, w in enumerate([*cfg.stem_widths, cfg.embed_dim]):
            sfx = "" if i == 0 else str(i)  # reference names: proj_conv, proj_conv1, ...
            self.add_module(f"proj_conv{sfx}", _init_conv(nn.Conv2d(cin, w, 3, 1, 1, bias=False)))
            self.add_module(f"proj_bn{sfx}", nn.BatchNorm2d(w))
            self.add_module(f"proj_lif{sfx}", _neuron(cfg))
            cin = w
        D = cfg.embed_dim
        self.rpe_conv = _init_conv(nn.Conv2d(D, D, 3, 1, 1, bias=False))
        self.rpe_bn = nn.BatchNorm2d(D)
        self.rpe_lif = _neuron(cfg)  # built by the reference, never called

    def stage(self, i: int) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module]:
        sfx = "" if i == 0 else str(i)
        return getattr(self, f"proj_conv{sfx}"), getattr(self, f"proj_bn{sfx}"), getattr(self, f"proj_lif{sfx}")

    def forward_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stem stage i. Stage 0 takes the images [B, C, H, W]; stages 0-2 return spikes
        [T*B, C, H, W]; stage 3 returns the start of the residual stream, tokens [T, B, N, D]."""
        T = self.T
        conv, bn, lif = self.stage(i)
        if i == 0 and self.training:
            x = bn(conv(x.repeat(T, 1, 1, 1)))  # as the reference, so BN statistics see T*B images
            x = x.view(T, -1, *x.shape[1:])
        elif i == 0:
            x = bn(conv(x))  # eval: the T copies are identical, so conv and BN run once
            x = x.unsqueeze(0).expand(T, *x.shape)
        else:
            x = bn(conv(x))
        if i < STEM_STAGES - 1:
            x = lif(x if i == 0 else x.view(T, -1, *x.shape[1:])).flatten(0, 1)
            if self.pool_after[i]:
                x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
            return x
        if self.pool_after[i]:  # stage 3 pools the real-valued BN output, before any neuron
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        feat = x
        s = lif(x.view(T, -1, *x.shape[1:])).flatten(0, 1)
        x = self.rpe_bn(self.rpe_conv(s)) + feat
        # [T*B, D, H, W] -> channel-last tokens [T, B, N, D]
        return x.flatten(2).transpose(1, 2).reshape(T, -1, x.shape[2] * x.shape[3], x.shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for i in range(STEM_STAGES):
            x = self.forward_stage(i, x)
        return x


class SDSA(nn.Module):
    """Spike-driven self-attention (MS_SSA_Conv): s = LIF(x); q, k, v = LIF(BN(conv1x1(s)));
    out = q * LIF_0.5(sum over tokens of k * v); x + proj_bn(proj_conv(out))."""

    def __init__(self, cfg: SDTConfig, widths: dict):
        super().__init__()
        D, C = cfg.embed_dim, widths["attn_dim"]
        self.heads, self.attn_dim = widths["heads"], C
        for name in ("q", "k", "v"):
            self.add_module(f"{name}_conv", _init_conv(nn.Conv2d(D, C, 1, 1, bias=False)))
            self.add_module(f"{name}_bn", nn.BatchNorm2d(C))
            self.add_module(f"{name}_lif", _neuron(cfg))
        self.attn_lif = _neuron(cfg, cfg.kv_v_threshold)  # built by the reference, never called
        # built by the reference, never called: loaded so checkpoints fit, counted as dead weight
        self.talking_heads = nn.Conv1d(self.heads, self.heads, 1, 1, bias=False)
        self.talking_heads_lif = _neuron(cfg, cfg.kv_v_threshold)
        self.proj_conv = _init_conv(nn.Conv2d(C, D, 1, 1))
        self.proj_bn = nn.BatchNorm2d(D)
        self.shortcut_lif = _neuron(cfg)

    def _spikes(self, name: str, s: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"{name}_lif")(_batchnorm(getattr(self, f"{name}_bn"),
                                                       _pointwise(getattr(self, f"{name}_conv"), s)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shortcut_lif(x)  # [T, B, N, D]
        q, k, v = self._spikes("q", s), self._spikes("k", s), self._spikes("v", s)  # [T, B, N, C]
        # per channel: does any token fire in both k and v (a sum of 0/1 products: exact in float)
        kv = self.talking_heads_lif((k * v).sum(2, keepdim=True))  # [T, B, 1, C]
        return x + _batchnorm(self.proj_bn, _pointwise(self.proj_conv, q * kv))


class MLP(nn.Module):
    """MS_MLP_Conv: fc1_bn(fc1_conv(fc1_lif(x))) [+ x, if mlp_residual]; fc2 likewise; + shortcut."""

    def __init__(self, cfg: SDTConfig, widths: dict):
        super().__init__()
        D, M = cfg.embed_dim, widths["mlp_hidden"]
        self.hidden, self.res = M, widths["mlp_residual"]
        self.fc1_conv = _init_conv(nn.Conv2d(D, M, 1, 1))
        self.fc1_bn = nn.BatchNorm2d(M)
        self.fc1_lif = _neuron(cfg)
        self.fc2_conv = _init_conv(nn.Conv2d(M, D, 1, 1))
        self.fc2_bn = nn.BatchNorm2d(D)
        self.fc2_lif = _neuron(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        a = _batchnorm(self.fc1_bn, _pointwise(self.fc1_conv, self.fc1_lif(x)))
        if self.res:
            a = identity + a
            identity = a
        return _batchnorm(self.fc2_bn, _pointwise(self.fc2_conv, self.fc2_lif(a))) + identity


class Block(nn.Module):
    def __init__(self, cfg: SDTConfig, widths: dict):
        super().__init__()
        self.attn = SDSA(cfg, widths)
        self.mlp = MLP(cfg, widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))  # each adds its own shortcut


class SDT(nn.Module):
    family = "sdt"

    def __init__(self, cfg: SDTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = SPS(cfg)
        self.block = nn.ModuleList(Block(cfg, w) for w in cfg.blocks)
        self.head_lif = _neuron(cfg)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Residual tokens [T, B, N, D] -> logits: token mean, head_lif, head per step, mean over T."""
        return self.head(self.head_lif(tokens.mean(2))).mean(0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> logits [B, classes] (the reference returns (logits, hook))."""
        c = self.cfg
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_channels, c.img_size, c.img_size):
            raise SpikepruneError(f"expected images [B, {c.in_channels}, {c.img_size}, {c.img_size}], "
                                  f"got {list(images.shape)}")
        x = self.patch_embed(images)
        for blk in self.block:
            x = blk(x)
        return self.forward_head(x)

    def config_dict(self) -> dict:
        return {"family": self.family, "config": self.cfg.to_dict()}

    def dead_params(self) -> int:
        """Parameters the forward never uses: every talking_heads, and in plif mode rpe_lif.w and
        each attn_lif.w (the reference builds them; they load with its checkpoints)."""
        return sum(p.numel() for name, p in self.named_parameters() if _is_dead(name))


def _is_dead(key: str) -> bool:
    return ".talking_heads." in key or key.startswith("talking_heads.") or ".attn_lif." in key \
        or key.startswith("patch_embed.rpe_lif.")


# ---------------------------------------------------------------------------------------------
# Presets (the reference's conf/*.yml: num_heads 8, mlp_ratio 4, qkv_bias False, spike_mode lif)
# ---------------------------------------------------------------------------------------------
_IMAGENET = dict(img_size=224, in_channels=3, num_classes=1000, pool_after="1111", num_heads=8)
_CIFAR = dict(img_size=32, in_channels=3, pool_after="0011", num_heads=8)
# 28x28 digits, sized so CPU training is quick (the bundled SDT): pooling after stem stages 0 and 2
# (28 -> 14 -> 7, 49 tokens) runs stages 1-2 at 14x14 instead of the CIFAR "0011"'s 28x28 (2x faster),
# T=2 halves it again, and D=64 at depth 1 quarters it once more
_MNIST = dict(img_size=28, in_channels=1, num_classes=10, pool_after="1010", T=2)

PRESETS: dict[str, dict] = {
    "sdt-8-384": dict(_IMAGENET, embed_dim=384, depth=8),
    "sdt-6-512": dict(_IMAGENET, embed_dim=512, depth=6),
    "sdt-8-512": dict(_IMAGENET, embed_dim=512, depth=8),
    "sdt-10-512": dict(_IMAGENET, embed_dim=512, depth=10),
    "sdt-8-768": dict(_IMAGENET, embed_dim=768, depth=8),
    "sdt-cifar10-2-256": dict(_CIFAR, num_classes=10, embed_dim=256, depth=2),
    "sdt-cifar10-2-512": dict(_CIFAR, num_classes=10, embed_dim=512, depth=2),
    "sdt-cifar100-2-256": dict(_CIFAR, num_classes=100, embed_dim=256, depth=2),
    "sdt-cifar100-2-512": dict(_CIFAR, num_classes=100, embed_dim=512, depth=2),
    # Sized for the bundled 28x28 mnist5k digits (CPU training); the CIFAR stem and pooling.
    "sdt-1-64-mnist": dict(_MNIST, embed_dim=64, depth=1, num_heads=8),
    # The Spikformer Fashion-MNIST preset's sizes (D=128, depth 2, stem 16-32-64, T=2), so the two
    # families compare at one width and one training cost (about 100 images/s on one CPU thread).
    "sdt-2-128-fmnist": dict(_MNIST, embed_dim=128, depth=2, num_heads=8, stem_widths=[16, 32, 64]),
}


for _name, _build in preset_builders(SDT, SDTConfig, PRESETS, "SDT").items():
    register_model(_name, family="sdt")(_build)


# ---------------------------------------------------------------------------------------------
# Checkpoints from the reference training code (timm's CheckpointSaver)
# ---------------------------------------------------------------------------------------------
def _unwrap(state: dict, ema: bool = False) -> dict:
    """The weights of a checkpoint: `state_dict` (or `state_dict_ema` when `ema`), else the dict itself."""
    inner = unwrap(state, EMA_WRAPPERS if ema else WRAPPERS)
    if inner is not None:
        return inner
    if ema:
        raise SpikepruneError("the checkpoint has no state_dict_ema (it was trained without EMA); "
                              "load its state_dict instead")
    return state


def checkpoint_filter_fn(state_dict: dict, model: SDT, ema: bool = False) -> dict:
    """Map a reference checkpoint onto our names: unwrap (`state_dict`, or `state_dict_ema` when
    `ema`), skip non-tensors (the `args` Namespace, epoch, ...), strip `module.`.

    Raises SpikepruneError naming the first mismatched keys and shapes if it does not fit.
    """
    out = strip_module(_unwrap(state_dict, ema))
    model_keys = model.state_dict()
    hint = ""
    if any(k.endswith(".w") for k in (set(model_keys) ^ set(out))):
        hint = " The checkpoint and the model differ in spike_mode (lif / plif)."
    return fit_state(out, model, "SDT", hint)


def _recognizes(state: dict) -> bool:
    """An SDT checkpoint (any wrapping): the stem's rpe_conv with attention q_conv as a 1x1 Conv2d
    [out, in, 1, 1] or the talking_heads Conv1d. Spikformer has neither (its ImageNet q_conv is a
    Conv1d [out, in, 1]; its CIFAR layout has q_linear)."""
    for wrapper in (*WRAPPERS, *EMA_WRAPPERS):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    keys = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if not any(k.startswith("patch_embed.rpe_conv") for k in keys):
        return False
    return any(".attn.talking_heads." in k or (k.endswith(".attn.q_conv.weight") and isinstance(v, torch.Tensor)
                                               and v.dim() == 4) for k, v in keys.items())


def load_reference_checkpoint(model: SDT, path, ema: bool = False) -> SDT:
    """Load a reference training checkpoint into `model`; `ema` takes its `state_dict_ema`
    (create_model(name, checkpoint_path=...) takes `state_dict`)."""
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise SpikepruneError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    model.load_state_dict(checkpoint_filter_fn(state, model, ema=ema), strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# What the engine needs to know about the family
# ---------------------------------------------------------------------------------------------
def _stem_names(i: int) -> tuple[str, str, str]:
    sfx = "" if i == 0 else str(i)
    return f"patch_embed.proj_conv{sfx}", f"patch_embed.proj_bn{sfx}", f"patch_embed.proj_lif{sfx}"


def stem_group_name(i: int) -> str:
    """The group cutting the output channels of stem conv i (0-based; i < STEM_STAGES - 1)."""
    return "stem." + _stem_names(i)[0].split(".")[1]


def sdt_groups(model: SDT) -> list[Group]:
    cfg = model.cfg
    out: list[Group] = []
    for i in range(STEM_STAGES - 1):  # stem convs 0..2: outputs + BN, the next conv's inputs
        conv, bn, lif = _stem_names(i)
        nxt = _stem_names(i + 1)[0]
        out.append(Group(
            name=stem_group_name(i), kind="stem", unit="channel", size=cfg.stem_widths[i],
            members=[Member(conv, 0), Member(bn, 0), Member(nxt, 1)],
            probes=[Probe(lif, "output", 2, (nxt,))]))  # [T, B, C, H, W] spikes (pooling keeps the channel)

    # Residual: every writer of the stream (the last stem conv, rpe, each proj and fc2, with their
    # BNs) on its output channels, every reader (rpe, q, k, v, fc1, head) on its input channels;
    # an MLP with the inner residual adds its hidden channels to the stream, so they are the stream's.
    conv3, bn3, lif3 = _stem_names(STEM_STAGES - 1)
    res = [Member(conv3, 0), Member(bn3, 0),
           Member("patch_embed.rpe_conv", 1), Member("patch_embed.rpe_conv", 0), Member("patch_embed.rpe_bn", 0)]
    probes = [Probe(lif3, "output", 2, ("patch_embed.rpe_conv",))]
    for i, blk in enumerate(model.block):
        a, m = f"block.{i}.attn", f"block.{i}.mlp"
        res += [Member(f"{a}.q_conv", 1), Member(f"{a}.k_conv", 1), Member(f"{a}.v_conv", 1),
                Member(f"{a}.proj_conv", 0), Member(f"{a}.proj_bn", 0), Member(f"{m}.fc1_conv", 1)]
        probes += [Probe(f"{a}.shortcut_lif", "output", -1, (f"{a}.q_conv", f"{a}.k_conv", f"{a}.v_conv")),
                   Probe(f"{m}.fc1_lif", "output", -1, (f"{m}.fc1_conv",))]
        if blk.mlp.res:
            res += [Member(f"{m}.fc1_conv", 0), Member(f"{m}.fc1_bn", 0), Member(f"{m}.fc2_conv", 1)]
            probes.append(Probe(f"{m}.fc2_lif", "output", -1, (f"{m}.fc2_conv",)))
        res += [Member(f"{m}.fc2_conv", 0), Member(f"{m}.fc2_bn", 0)]
    res.append(Member("head", 1))
    probes.append(Probe("head_lif", "output", -1, ("head",)))
    out.append(Group(name="residual", kind="residual", unit="channel", size=cfg.embed_dim,
                     members=res, probes=probes))

    for i, blk in enumerate(model.block):
        a, m = f"block.{i}.attn", f"block.{i}.mlp"
        # q, k, v and proj's input meet elementwise (q * LIF(sum_tokens k * v)): one index set. Kind
        # "qk": a channel silent in q, or whose k*v never fires, adds nothing (the probes' product).
        out.append(Group(
            name=f"block{i}.attn.qkv", kind="qk", unit="channel", size=blk.attn.attn_dim,
            members=[Member(f"{a}.q_conv", 0), Member(f"{a}.q_bn", 0), Member(f"{a}.k_conv", 0),
                     Member(f"{a}.k_bn", 0), Member(f"{a}.v_conv", 0), Member(f"{a}.v_bn", 0),
                     Member(f"{a}.proj_conv", 1)],
            probes=[Probe(f"{a}.q_lif", "output", -1, (f"{a}.proj_conv",)),
                    Probe(f"{a}.talking_heads_lif", "output", -1)],
            probe_reduce="prod"))
        if not blk.mlp.res:
            out.append(Group(
                name=f"block{i}.mlp.hidden", kind="hidden", unit="channel", size=blk.mlp.hidden,
                members=[Member(f"{m}.fc1_conv", 0), Member(f"{m}.fc1_bn", 0), Member(f"{m}.fc2_conv", 1)],
                probes=[Probe(f"{m}.fc2_lif", "output", -1, (f"{m}.fc2_conv",))]))
    return out


def sdt_resize(model: SDT, kept: dict[str, int]) -> SDT:
    """An SDT with the kept unit counts; each block's mlp_residual stays what the model had."""
    cfg = model.cfg.to_dict()
    cfg["embed_dim"] = kept["residual"]
    cfg["stem_widths"] = [kept[stem_group_name(i)] for i in range(STEM_STAGES - 1)]
    for i, b in enumerate(cfg["blocks"]):
        b["attn_dim"] = kept[f"block{i}.attn.qkv"]
        b["mlp_hidden"] = kept["residual"] if b["mlp_residual"] else kept[f"block{i}.mlp.hidden"]
    return SDT(SDTConfig.from_dict(cfg))


# The forward cut into stages (stem.3 = the last stem stage + rpe, giving the residual tokens);
# the head is SDT.forward_head.
STAGED = StagedTransformer(STEM_STAGES, lambda i: stem_group_name(i), lambda model, x: model.forward_head(x), "an SDT")


def sdt_layer_table(cfg: SDTConfig) -> list[Layer]:
    """Every weight layer (and each block's attention product) in forward order, with its cost
    (spikeprune.costs gives the rules: MACs per image over all T steps). Every conv after the
    first reads spikes (each branch starts with a LIF); the head reads head_lif's spikes too."""
    T, D = cfg.T, cfg.embed_dim
    rows: list[Layer] = []
    side, cin = cfg.img_size, cfg.in_channels
    for i, w in enumerate([*cfg.stem_widths, D]):
        conv, bn, _ = _stem_names(i)
        rows.append(Layer(conv, "Conv2d", (w, cin, 3, 3), False, bn, w, "image" if i == 0 else "spikes",
                          w * cin * 9 * side * side * T))
        if cfg.pool_after[i]:
            side = (side - 1) // 2 + 1  # MaxPool2d(3, stride 2, padding 1)
        cin = w
    N = side * side
    rows.append(Layer("patch_embed.rpe_conv", "Conv2d", (D, D, 3, 3), False, "patch_embed.rpe_bn", D, "spikes",
                      D * D * 9 * N * T))
    for b, w in enumerate(cfg.blocks):
        a, m = f"block.{b}.attn", f"block.{b}.mlp"
        C, M, H = w["attn_dim"], w["mlp_hidden"], w["heads"]
        for name in ("q", "k", "v"):
            rows.append(Layer(f"{a}.{name}_conv", "Conv2d", (C, D, 1, 1), False, f"{a}.{name}_bn", C, "spikes",
                              C * D * N * T))
        # k * v summed over tokens (an AND and a count per channel and token), then the q mask: both
        # elementwise on spikes, N * C each per step
        rows.append(Layer(f"{a}.kv_mask", "SpikeMask", (), False, None, 0, "spikes", 2 * N * C * T,
                          rate_from=(f"{a}.k_lif", f"{a}.v_lif")))
        rows.append(Layer(f"{a}.talking_heads", "Conv1d", (H, H, 1), False, None, 0, "unused", 0))
        rows.append(Layer(f"{a}.proj_conv", "Conv2d", (D, C, 1, 1), True, f"{a}.proj_bn", D, "spikes",
                          D * C * N * T))
        rows.append(Layer(f"{m}.fc1_conv", "Conv2d", (M, D, 1, 1), True, f"{m}.fc1_bn", M, "spikes", M * D * N * T))
        rows.append(Layer(f"{m}.fc2_conv", "Conv2d", (D, M, 1, 1), True, f"{m}.fc2_bn", D, "spikes", D * M * N * T))
    # the head runs per step on head_lif's spikes (the reference applies it before the mean over T)
    rows.append(Layer("head", "Linear", (cfg.num_classes, D), True, None, 0, "spikes", cfg.num_classes * D * T))
    if cfg.spike_mode == "plif":  # one learnable leak per neuron module, no MACs
        rows += [Layer(n, "PLIF", (1,), False, None, 0, "unused", 0) for n in _neuron_names(cfg.depth)]
    return rows


def _describe(cfg: SDTConfig) -> str:
    pools = "".join("1" if p else "0" for p in cfg.pool_after)
    return (f"SDT D={cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, {cfg.in_channels}x{cfg.img_size}x"
            f"{cfg.img_size}, {cfg.num_classes} classes, T={cfg.T}, pooling {pools}, {cfg.spike_mode}; "
            f"{_dead_count(cfg):,} params never used (talking_heads{', attn_lif/rpe_lif leaks' if cfg.spike_mode == 'plif' else ''})")


def _dead_count(cfg: SDTConfig) -> int:
    dead = sum(b["heads"] ** 2 for b in cfg.blocks)
    if cfg.spike_mode == "plif":
        dead += 1 + cfg.depth  # rpe_lif.w and each attn_lif.w
    return dead


FAMILY = register_family(Family(
    name="sdt", model_class=SDT, config_class=SDTConfig,
    groups=sdt_groups, resize=sdt_resize, layer_table=sdt_layer_table,
    checkpoint_filter=checkpoint_filter_fn, stages=STAGED.stages, run_stage=STAGED.run_stage,
    first_stage=STAGED.first_stage, describe=_describe, recognizes=_recognizes, one_step=one_time_step,
    cost_notes=("SDT: every conv after the first reads spikes (membrane shortcut: each branch starts with a LIF on "
                "the real-valued residual stream), so q/k/v, proj, fc1, fc2, rpe and the head count SOPs; only the "
                "first conv reads the (real) image",
                "SDT attention: kv_mask counts the k*v AND-and-count over tokens and the q mask, 2*N*C per step; there "
                "is no q-k contraction",
                "SDT: talking_heads (and in plif mode rpe_lif.w / attn_lif.w) are built by the reference and never "
                "called: their parameters are counted (input 'unused', no MACs)")))
