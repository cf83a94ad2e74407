"""What every family file needs and would otherwise write again, so that a family file holds only
what differs between architectures: strict config reading, the pooled image-size rule, building a
preset (the role timm's build_model_with_cfg plays), layers on channel-last tokens, the staged
forward of a stem-then-blocks transformer, and matching a foreign checkpoint's tensors against a
model."""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpikepruneError

WRAPPERS = ("state_dict", "model")  # where training scripts keep the weights
EMA_WRAPPERS = ("state_dict_ema", "model_ema")  # ... and their exponential moving average


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
def build_model_with_cfg(model_class, config_class, presets: dict, name: str, **overrides) -> nn.Module:
    """The model of preset `name`: its config with `overrides` on top, built (and checked) by the
    family's config class, then the model class."""
    cfg = dict(presets[name])
    cfg.update(overrides)
    return model_class(config_class(**cfg))


def preset_builders(model_class, config_class, presets: dict, label: str) -> dict[str, Callable[..., nn.Module]]:
    """One builder per preset (build(**overrides) -> model), named and documented, for register_model."""
    def builder(name: str):
        def build(**overrides) -> nn.Module:
            return build_model_with_cfg(model_class, config_class, presets, name, **overrides)
        build.__doc__ = f"{label} preset {name}: {presets[name]}"
        return build
    return {name: builder(name) for name in presets}


def one_time_step(model: nn.Module) -> nn.Module:
    """The model rebuilt with T=1 and its weights (eval mode, same dtype and device): for a
    stem-then-blocks transformer whose eval forward repeats the image over T, acts on each step
    alone in every layer but the neurons, and averages the per-step output over T."""
    twin = type(model)(type(model.cfg).from_dict({**model.cfg.to_dict(), "T": 1}))
    twin.load_state_dict(model.state_dict())
    p = next(model.parameters(), None)
    return (twin.to(dtype=p.dtype, device=p.device) if p is not None else twin).eval()


# ---------------------------------------------------------------------------------------------
# Layers on channel-last tokens
# ---------------------------------------------------------------------------------------------
def pointwise(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A k=1 Conv1d / Conv2d or a Linear, applied to channel-last x [..., C_in] as one GEMM."""
    w = layer.weight
    # on a 2-D input the bias is fused into the GEMM (addmm); a 4-D input adds it in a second pass
    y = F.linear(x.reshape(-1, x.shape[-1]), w.view(w.shape[0], w.shape[1]), layer.bias)
    return y.view(*x.shape[:-1], w.shape[0])


def batchnorm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """A BatchNorm1d / BatchNorm2d over the last dim of channel-last x; statistics over every other
    position (a BatchNorm2d sees each position as a 1x1 image)."""
    c = x.shape[-1]
    flat = x.reshape(-1, c) if isinstance(bn, nn.BatchNorm1d) else x.reshape(-1, c, 1, 1)
    return bn(flat).view(x.shape)


# ---------------------------------------------------------------------------------------------
# The staged forward of a stem-then-blocks transformer
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StagedTransformer:
    """The forward cut into stages for the sensitivity cache: stem.0 .. stem.{S-1}
    (model.patch_embed.forward_stage(i, x); the last gives the residual tokens), block.0 ..
    block.{L-1} (model.block[i]), head (head(model, tokens) -> logits), exactly as the model's
    forward runs them (the analysis checks on real data that every stage in turn equals
    model(images)). stem_group(i) names the group cutting stem conv i's outputs; `label` names the
    family in errors ("a Spikformer")."""
    stem_stages: int
    stem_group: Callable[[int], str]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    label: str

    def stages(self, model: nn.Module) -> list[str]:
        return ([f"stem.{i}" for i in range(self.stem_stages)] + [f"block.{i}" for i in range(len(model.block))]
                + ["head"])

    def run_stage(self, model: nn.Module, s: int, x: torch.Tensor) -> torch.Tensor:
        if s < self.stem_stages:
            return model.patch_embed.forward_stage(s, x)
        if s < self.stem_stages + len(model.block):
            return model.block[s - self.stem_stages](x)
        return self.head(model, x)

    def first_stage(self, model: nn.Module, group: str) -> int:
        """The first stage a group changes: a stem group changes the stage of its conv; the residual
        width is first produced by the last stem stage; a block group changes its block."""
        for i in range(self.stem_stages - 1):
            if group == self.stem_group(i):
                return i
        if group == "residual":
            return self.stem_stages - 1
        if group.startswith("block"):
            return self.stem_stages + int(group[len("block"):].split(".")[0])
        raise SpikepruneError(f"{group!r} is not {self.label} group")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def unwrap(state: dict, wrappers=WRAPPERS) -> dict | None:
    """The weights a training script wrapped under the first of `wrappers` the checkpoint has, or None."""
    for wrapper in wrappers:
        if isinstance(state.get(wrapper), dict):
            return state[wrapper]
    return None


def strict_config(cls, d: dict, family: str):
    """`cls(**d)` for a saved config that must spell out every field: an unknown or a missing one is
    an error, never a default (a default img_size would evaluate at the wrong size, silently)."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise SpikepruneError(f"unknown {family} config fields: {unknown}")
    missing = [k for k in known if k not in d]
    if missing:
        raise SpikepruneError(f"the {family} config lacks {', '.join(missing)}: a saved config must spell out "
                              "every field (re-save the model with spikeprune)")
    return cls(**copy.deepcopy(d))


def check_pooled_size(img_size: int, pool_after: list[bool], what: str) -> None:
    """A stem that max-pools k times (3x3, stride 2, padding 1) takes sizes divisible by 2^k."""
    stride = 2 ** sum(pool_after)
    if img_size % stride:
        ok = [s for s in (28, 32, 64, 96, 128, 160, 192, 224, 256) if s % stride == 0]
        raise SpikepruneError(f"image size {img_size} cannot be taken: this {what} stem pools {sum(pool_after)} "
                              f"times, so the size must be a multiple of {stride} (e.g. {ok[:4]})")


def pooled_tokens(img_size: int, pool_after: list[bool]) -> int:
    side = img_size // 2 ** sum(pool_after)
    return side * side


def strip_module(state: dict) -> dict:
    """Tensors only (no `args`, epoch, ...), with DataParallel's `module.` prefix removed."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def fit_state(out: dict, model: nn.Module, family: str, hint: str = "") -> dict:
    """`out` if its names and shapes are exactly the model's; else an error naming the first
    mismatched keys and shapes."""
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
            f"checkpoint does not fit this {family} model -- " + " | ".join(lines) + "." + hint
            + " Check the preset (and overrides such as num_classes or img_size) matches the training run.")
    return out
