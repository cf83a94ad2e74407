"""Our Spikformer computes exactly what the reference code computes (both layouts, float64, train and
eval mode, outputs and gradients), carries the reference's state-dict names and shapes, has the
spec's parameter counts, and loads reference checkpoints in every wrapping -- or fails clearly."""
import argparse
import copy
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from spikeprune.errors import SpikepruneError
from spikeprune.models import create_model, list_models
from spikeprune.models.spikformer import checkpoint_filter_fn, reference_state_dict
from spikeprune.neuron import LIF
from spikeprune.serialization import load_model, save_model
from spikeprune.testing.reference_spikformer import MultiStepLIFNode, reference_from_config
from spiking_helpers import spike_rates


# A copy of shared/spec/official-spikformer-state-dict.tsv (every entry of the reference 8-512 ImageNet
# and 4-384 CIFAR state dicts), kept beside the tests so a fresh clone can run them.
SPEC = Path(__file__).parent / "data" / "official-spikformer-state-dict.tsv"

# Tiny configs for each layout: the ImageNet stem pools 4 times, so 64 px gives 4x4 = 16 tokens
# (enough for the attention LIF at threshold 0.5 to fire); the CIFAR stem pools twice (16 -> 4x4).
TINY = {
    "imagenet": ("spikformer-8-512", dict(embed_dim=16, depth=2, num_heads=2, img_size=64, T=2, num_classes=5)),
    "cifar": ("spikformer-4-384", dict(embed_dim=16, depth=2, num_heads=2, img_size=16, T=2, num_classes=5)),
}


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """BN affine and running statistics away from their defaults, so every LIF fires sometimes and
    eval mode (running stats) differs from train mode (batch stats)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c, dt = m.num_features, m.weight.dtype
            m.weight.data = 0.5 + torch.rand(c, generator=g, dtype=dt)
            m.bias.data = 0.3 + 1.5 * torch.rand(c, generator=g, dtype=dt)
            m.running_mean.data = 0.3 * torch.randn(c, generator=g, dtype=dt)
            m.running_var.data = 0.5 + torch.rand(c, generator=g, dtype=dt)
            m.num_batches_tracked.fill_(7)


def _pair(layout: str, seed: int = 0, dtype=torch.float64):
    """(ours, reference transcription) with identical weights: the reference's weights are the source
    and are loaded into ours through checkpoint_filter_fn, as a user's checkpoint would be."""
    preset, overrides = TINY[layout]
    torch.manual_seed(seed)
    ref = reference_from_config(create_model(preset, **overrides).cfg).to(dtype)
    _randomize_bn(ref, seed)
    ours = create_model(preset, **overrides).to(dtype)
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ours), strict=True)
    return ours, ref


def _images(layout: str, batch: int = 3, seed: int = 1, dtype=torch.float64):
    size = TINY[layout][1]["img_size"]
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _assert_same_grads(ours: nn.Module, ref: nn.Module) -> None:
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        q = ref_params[name]
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # the reference's unused LayerNorms get no gradient: they hold no function
    assert all(p.grad is None for n, p in ref.named_parameters() if ".norm" in n)


@pytest.mark.parametrize("layout", ["imagenet", "cifar"])
def test_every_neuron_fires_in_the_equivalence_setup(layout):
    ours, ref = _pair(layout)
    rates = spike_rates(ref.train(), _images(layout))
    assert len(rates) == 5 + 7 * TINY[layout][1]["depth"]
    assert all(0.0 < r < 0.9 for r in rates.values()), rates  # the comparison below is not vacuous
    ours_rates = spike_rates(ours.train(), _images(layout))
    assert ours_rates.keys() == rates.keys()


@pytest.mark.parametrize("layout", ["imagenet", "cifar"])
def test_train_mode_outputs_gradients_and_bn_statistics_match_reference(layout):
    ours, ref = _pair(layout)
    ours.train(), ref.train()
    x = _images(layout)
    target = torch.tensor([0, 3, 4])
    out_ours, out_ref = ours(x), ref(x)
    assert out_ours.shape == (3, 5)
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-10, atol=1e-12)
    nn.functional.cross_entropy(out_ours, target).backward()
    nn.functional.cross_entropy(out_ref, target).backward()
    _assert_same_grads(ours, ref)

    # one optimizer step on each, then everything (weights, BN running stats, counters) still agrees
    for model in (ours, ref):
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    ref_state = reference_state_dict(ours)
    for name, value in ref.state_dict().items():
        if ".norm" not in name:
            torch.testing.assert_close(ref_state[name], value, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    ours.zero_grad(), ref.zero_grad()
    x2 = _images(layout, seed=2)
    torch.testing.assert_close(ours(x2), ref(x2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["imagenet", "cifar"])
def test_eval_mode_outputs_and_gradients_match_reference(layout):
    ours, ref = _pair(layout, seed=3)
    ours.eval(), ref.eval()
    x = _images(layout, batch=4, seed=5)
    out_ours, out_ref = ours(x), ref(x)
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-10, atol=1e-12)
    # eval uses the running statistics: the answer differs from train mode's batch statistics
    # (on a copy: a train-mode forward updates the running statistics)
    assert not torch.allclose(out_ours, copy.deepcopy(ours).train()(x).detach())
    w = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    (out_ours * w).sum().backward()
    (out_ref * w).sum().backward()
    _assert_same_grads(ours, ref)
    with torch.no_grad():  # the no-grad inference path takes the same values
        torch.testing.assert_close(ours(x), out_ref, rtol=1e-10, atol=1e-12)
    # no state between calls: a second call on the same input gives the same logits
    torch.testing.assert_close(ours(x), out_ours, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------
# Architecture facts: parameter counts and state-dict names / shapes
# -------------------------------------------------------------------------------------------------
# The spec's table (in millions, unused LayerNorms excluded); two are also given exactly. The table
# mixes truncation (16.81, 29.68) and rounding (36.01, 66.34), so "to the rounding the table gives"
# is: within one unit of its last digit.
TABLE = {"spikformer-8-384": 16.81, "spikformer-8-512": 29.68, "spikformer-10-512": 36.01,
         "spikformer-8-768": 66.34, "spikformer-4-384": 9.32}
EXACT = {"spikformer-8-512": 29_689_384, "spikformer-4-384": 9_324_730}


@pytest.mark.parametrize("preset", sorted(TABLE))
def test_parameter_counts_equal_the_spec_table(preset):
    n = sum(p.numel() for p in create_model(preset).parameters())
    if preset in EXACT:
        assert n == EXACT[preset]
    assert abs(n / 1e6 - TABLE[preset]) < 0.01, n


def _spec_entries() -> dict[str, list[tuple[str, tuple]]]:
    tables, current = {}, None
    for line in SPEC.read_text().splitlines():
        if line.startswith("#"):
            current = line[1:].split(":")[0].strip()  # e.g. "spikformer-8-512-imagenet"
            tables[current] = []
        elif line.strip():
            name, shape = line.split("\t")
            tables[current].append((name, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return tables


@pytest.mark.parametrize("preset,table", [("spikformer-8-512", "spikformer-8-512-imagenet"),
                                          ("spikformer-4-384", "spikformer-4-384-cifar")])
def test_state_dict_names_and_shapes_equal_the_reference(preset, table):
    spec = _spec_entries()[table]
    model = create_model(preset)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    norms = [(k, s) for k, s in spec if k.startswith("block.") and k.split(".")[2] in ("norm1", "norm2")]
    depth = model.cfg.depth
    assert len(norms) == 4 * depth  # norm1/norm2 weight + bias per block: the only entries we do not build
    assert ours == [e for e in spec if e not in norms]  # same names, same shapes, same order
    # and reference_state_dict puts them back exactly where the reference has them
    assert [(k, tuple(v.shape)) for k, v in reference_state_dict(model).items()] == spec


@pytest.mark.parametrize("layout", ["imagenet", "cifar"])
def test_reference_state_dict_loads_strictly_into_the_transcription(layout):
    preset, overrides = TINY[layout]
    ours = create_model(preset, **overrides)
    ref = reference_from_config(ours.cfg)
    result = ref.load_state_dict(reference_state_dict(ours), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours.eval(), ref.eval()
    x = _images(layout, dtype=torch.float32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------
# Loading reference checkpoints
# -------------------------------------------------------------------------------------------------
def _reference_checkpoint(layout: str):
    ours, ref = _pair(layout, seed=11, dtype=torch.float32)
    return ours.eval(), ref.state_dict()


WRAPPINGS = {
    "top-level": lambda sd: sd,
    "state_dict": lambda sd: {"epoch": 299, "arch": "spikformer", "state_dict": sd, "version": 2, "metric": 95.2},
    "model": lambda sd: {"model": sd, "epoch": 10},
    "module-prefix": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "module-prefix-top-level": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "without-norms": lambda sd: {k: v for k, v in sd.items() if ".norm" not in k},
    "without-norms-module": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items() if ".norm" not in k}},
}


@pytest.mark.parametrize("wrapping", sorted(WRAPPINGS))
@pytest.mark.parametrize("layout", ["imagenet", "cifar"])
def test_reference_checkpoint_loads_in_every_wrapping(layout, wrapping, tmp_path):
    ours, sd = _reference_checkpoint(layout)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(WRAPPINGS[wrapping](sd), path)
    preset, overrides = TINY[layout]
    loaded = create_model(preset, checkpoint_path=str(path), **overrides).eval()
    x = _images(layout, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_legacy_torch_save_format_loads(tmp_path):
    ours, sd = _reference_checkpoint("cifar")
    path = tmp_path / "old.pth"
    torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=False)
    loaded = create_model("spikformer-4-384", checkpoint_path=path, **TINY["cifar"][1]).eval()
    x = _images("cifar", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))


def test_timm_checkpoint_saver_file_with_args_namespace_loads(tmp_path):
    ours, sd = _reference_checkpoint("cifar")
    path = tmp_path / "checkpoint-299.pth.tar"
    args = argparse.Namespace(model="spikformer", lr=5e-4, epochs=300, mean=(0.4914, 0.4822, 0.4465), drop=None)
    torch.save({"epoch": 299, "arch": "spikformer", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []},
                "version": 2, "args": args, "metric": 95.19}, path)
    loaded = create_model("spikformer-4-384", checkpoint_path=path, **TINY["cifar"][1]).eval()
    x = _images("cifar", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))


def test_mismatching_checkpoint_names_first_key_and_shapes(tmp_path):
    _, sd = _reference_checkpoint("cifar")  # D = 16
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    overrides = dict(TINY["cifar"][1], embed_dim=32)
    with pytest.raises(SpikepruneError) as e:
        create_model("spikformer-4-384", checkpoint_path=path, **overrides)
    msg = str(e.value)
    # the first mismatched entry in state-dict order, with checkpoint and model shapes
    assert "patch_embed.proj_conv.weight [2, 3, 3, 3] vs [4, 3, 3, 3]" in msg
    assert "preset" in msg  # says what to check


def test_checkpoint_missing_a_key_names_it(tmp_path):
    _, sd = _reference_checkpoint("imagenet")
    del sd["block.1.mlp.fc2_conv.bias"]
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(SpikepruneError, match=r"missing from checkpoint \(1\): block\.1\.mlp\.fc2_conv\.bias"):
        create_model("spikformer-8-512", checkpoint_path=path, **TINY["imagenet"][1])


def test_checkpoint_of_the_other_layout_is_refused(tmp_path):
    _, sd = _reference_checkpoint("imagenet")
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    with pytest.raises(SpikepruneError, match="q_linear"):
        create_model("spikformer-4-384", checkpoint_path=path, **dict(TINY["cifar"][1], img_size=64))


def _write_bad_files(tmp_path: Path) -> dict[str, Path]:
    _, sd = _reference_checkpoint("cifar")
    good = tmp_path / "good.pth"
    torch.save({"state_dict": sd}, good)
    data = good.read_bytes()
    files = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint at all\n" * 10,
             "truncated-safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"}
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.pth"
        out[name].write_bytes(content)
    # a zip (torch format) whose tensor payload is damaged
    damaged = tmp_path / "damaged.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for item in zin.infolist():
            payload = zin.read(item)
            zout.writestr(item, payload if item.filename.endswith(".pkl") else payload[: len(payload) // 3])
    out["damaged-zip"] = damaged
    return out


def test_corrupt_truncated_and_empty_checkpoints_give_clear_errors(tmp_path):
    for name, path in _write_bad_files(tmp_path).items():
        with pytest.raises(SpikepruneError) as e:
            create_model("spikformer-4-384", checkpoint_path=path, **TINY["cifar"][1])
        assert str(path) in str(e.value), name
    with pytest.raises(SpikepruneError, match="does not exist"):
        create_model("spikformer-4-384", checkpoint_path=tmp_path / "nope.pth", **TINY["cifar"][1])


class _RunsCodeWhenUnpickled:
    """A pickle payload that would create a file if anything unpickled it without weights_only."""

    marker: Path = Path()

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_with_code_is_refused_and_never_executed(tmp_path, legacy):
    _, sd = _reference_checkpoint("cifar")
    _RunsCodeWhenUnpickled.marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": sd, "payload": _RunsCodeWhenUnpickled()}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(SpikepruneError) as e:
        create_model("spikformer-4-384", checkpoint_path=path, **TINY["cifar"][1])
    assert str(path) in str(e.value)
    assert not _RunsCodeWhenUnpickled.marker.exists()


def test_pickle_with_code_gets_the_refusal_message(tmp_path):
    _, sd = _reference_checkpoint("cifar")
    _RunsCodeWhenUnpickled.marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": sd, "payload": _RunsCodeWhenUnpickled()}, path)
    with pytest.raises(SpikepruneError) as e:
        create_model("spikformer-4-384", checkpoint_path=path, **TINY["cifar"][1])
    assert "refused: this file would run code when unpickled" in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_that_is_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(SpikepruneError, match="not a state dict"):
        create_model("spikformer-4-384", checkpoint_path=path, **TINY["cifar"][1])


# -------------------------------------------------------------------------------------------------
# Presets, sizes, save / load
# -------------------------------------------------------------------------------------------------
def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(SpikepruneError) as e:
        create_model("spikformer-9-999")
    for name in list_models():
        assert name in str(e.value)


@pytest.mark.parametrize("preset,size,stride", [("spikformer-8-512", 100, 16), ("spikformer-4-384", 30, 4)])
def test_impossible_image_size_errors(preset, size, stride):
    with pytest.raises(SpikepruneError, match=f"multiple of {stride}"):
        create_model(preset, img_size=size)


def test_bad_override_and_bad_widths_error():
    with pytest.raises(SpikepruneError, match="bad override"):
        create_model("spikformer-4-384", no_such_field=3)
    with pytest.raises(SpikepruneError, match="not divisible by heads"):
        create_model("spikformer-4-384", embed_dim=16, num_heads=3, img_size=16)


def test_wrong_input_shape_errors():
    model = create_model("spikformer-4-384", **TINY["cifar"][1])
    with pytest.raises(SpikepruneError, match="expected images"):
        model(torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize("layout", ["imagenet", "cifar"])
def test_save_load_round_trip(layout, tmp_path):
    ours, _ = _pair(layout, seed=4, dtype=torch.float32)
    ours.preset = TINY[layout][0]
    path = save_model(ours, tmp_path / "saved")
    loaded = load_model(path).eval()
    assert loaded.config_dict() == ours.config_dict()
    assert loaded.preset == ours.preset
    x = _images(layout, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours.eval()(x))
    # a checkpoint path may also point at a saved folder
    again = create_model(TINY[layout][0], checkpoint_path=path, **TINY[layout][1]).eval()
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


def test_unequal_widths_round_trip(tmp_path):
    base = create_model("spikformer-4-384", **TINY["cifar"][1])
    cfg = base.cfg.to_dict()
    cfg["stem_widths"] = [3, 5, 7]
    cfg["blocks"] = [dict(heads=2, qk_dim=6, v_dim=10, mlp_hidden=20), dict(heads=1, qk_dim=3, v_dim=5, mlp_hidden=9)]
    from spikeprune.models import build_from_config

    model = build_from_config({"family": "spikformer", "config": cfg}).eval()
    assert model.block[1].attn.layer("v").weight.shape == (5, 16)
    assert model.block[0].mlp.layer("fc2").weight.shape == (16, 20)
    x = _images("cifar", dtype=torch.float32)
    loaded = load_model(save_model(model, tmp_path / "pruned")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.cfg.blocks == cfg["blocks"]


def test_damaged_saved_folder_errors(tmp_path):
    model = create_model("spikformer-4-384", **TINY["cifar"][1])
    path = save_model(model, tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SpikepruneError, match="corrupt or truncated"):
        load_model(path)
    weights.unlink()
    with pytest.raises(SpikepruneError, match="missing"):
        load_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(SpikepruneError, match="not valid JSON"):
        load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(SpikepruneError, match="not a saved spikeprune model"):
        load_model(path)


def test_saved_folder_with_weights_of_other_widths_errors(tmp_path):
    small = save_model(create_model("spikformer-4-384", **TINY["cifar"][1]), tmp_path / "small")
    big = save_model(create_model("spikformer-4-384", **dict(TINY["cifar"][1], embed_dim=32)), tmp_path / "big")
    (small / "model.safetensors").write_bytes((big / "model.safetensors").read_bytes())
    # the config fingerprint in the weights' metadata finds it before any shape is compared
    with pytest.raises(SpikepruneError, match="do not match its config|not the config these weights were saved with"):
        load_model(small)


def test_no_failed_save_leaves_a_half_written_folder(tmp_path):
    model = create_model("spikformer-4-384", **TINY["cifar"][1])
    model.config_dict = lambda: {"family": "spikformer", "config": {"bad": object()}}  # not JSON-able
    with pytest.raises(TypeError):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_reference_transcription_refuses_configs_it_cannot_express():
    model = create_model("spikformer-4-384", **TINY["cifar"][1])
    cfg = model.cfg
    cfg.blocks[0]["mlp_hidden"] = 7
    with pytest.raises(ValueError, match="blocks"):
        reference_from_config(cfg)
