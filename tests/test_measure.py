"""measure(): parameters, memory, MACs against hand-computed numbers; SOPs, energy and latency from a
forward; per-layer rows summing to the totals; the `spikeprune measure` command."""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import importlib

from spikeprune.cli import register_measure

M = importlib.import_module("spikeprune.costs")  # the package binds the function `measure`
from spikeprune.errors import SpikepruneError
from spikeprune.models import build_from_config, create_model
from spiking_helpers import spike_rates

# cifar layout: 16x16 grey digits, D=16, 1 block, 2 heads, T=2 (the hand numbers below are for these)
CIFAR = ("spikformer-1-32-digits", dict(embed_dim=16, num_heads=2, T=2))
# imagenet layout: 64x64 RGB (16 tokens: enough for the attention LIF to fire), D=16, 1 block, 2 heads,
# T=2, 5 classes
IMAGENET = ("spikformer-8-512", dict(embed_dim=16, depth=1, num_heads=2, img_size=64, T=2, num_classes=5))


def _model(spec, seed=0, fire=True):
    torch.manual_seed(seed)
    model = create_model(spec[0], **spec[1])
    if fire:  # BN biases up, so that every LIF fires and the rates are not all zero
        g = torch.Generator().manual_seed(seed)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.bias.data = 0.3 + 1.5 * torch.rand(m.num_features, generator=g)
    return model.eval()


def _images(model, n=12, seed=1):
    c = model.cfg
    return torch.rand(n, c.in_channels, c.img_size, c.img_size, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------------------
# Hand-computed numbers
# -------------------------------------------------------------------------------------------------
# name: (params incl. BN affine, weights, MACs per image over T=2 steps)
HAND_CIFAR = {
    # stem widths 2, 4, 8, 16; 16x16 until pooled after stages 3 and 4 -> 8x8 -> 4x4 = 16 tokens
    "patch_embed.proj_conv": (18 + 4, 18, 18 * 256 * 2),        # 2x1x3x3
    "patch_embed.proj_conv1": (72 + 8, 72, 72 * 256 * 2),       # 4x2x3x3
    "patch_embed.proj_conv2": (288 + 16, 288, 288 * 256 * 2),   # 8x4x3x3 at 16x16, then pool
    "patch_embed.proj_conv3": (1152 + 32, 1152, 1152 * 64 * 2),  # 16x8x3x3 at 8x8, then pool
    "patch_embed.rpe_conv": (2304 + 32, 2304, 2304 * 16 * 2),   # 16x16x3x3 at 4x4
    "block.0.attn.q_linear": (256 + 16 + 32, 256, 256 * 16 * 2),  # Linear 16->16 with bias, BN 16
    "block.0.attn.k_linear": (304, 256, 256 * 16 * 2),
    "block.0.attn.v_linear": (304, 256, 256 * 16 * 2),
    "block.0.attn.matmul": (0, 0, 2 * 16 * 8 * 8 * 2 * 2),     # 2 N d_qk d_v per head (2 heads), per step
    "block.0.attn.proj_linear": (304, 256, 256 * 16 * 2),
    "block.0.mlp.fc1_linear": (1024 + 64 + 128, 1024, 1024 * 16 * 2),
    "block.0.mlp.fc2_linear": (1024 + 16 + 32, 1024, 1024 * 16 * 2),
    "head": (160 + 10, 160, 160),                              # once, on the averaged features
}
HAND_IMAGENET = {
    # 64x64, pooled after every stage: 64 -> 32 -> 16 -> 8 -> 4, so 16 tokens
    "patch_embed.proj_conv": (54 + 4, 54, 54 * 4096 * 2),      # 2x3x3x3 at 64x64
    "patch_embed.proj_conv1": (72 + 8, 72, 72 * 1024 * 2),     # at 32x32
    "patch_embed.proj_conv2": (288 + 16, 288, 288 * 256 * 2),  # at 16x16
    "patch_embed.proj_conv3": (1152 + 32, 1152, 1152 * 64 * 2),  # at 8x8
    "patch_embed.rpe_conv": (2304 + 32, 2304, 2304 * 16 * 2),  # at 4x4
    "block.0.attn.q_conv": (256 + 32, 256, 256 * 16 * 2),      # Conv1d k=1, no bias
    "block.0.attn.k_conv": (288, 256, 256 * 16 * 2),
    "block.0.attn.v_conv": (288, 256, 256 * 16 * 2),
    "block.0.attn.matmul": (0, 0, 2 * 16 * 8 * 8 * 2 * 2),
    "block.0.attn.proj_conv": (256 + 16 + 32, 256, 256 * 16 * 2),  # with bias
    "block.0.mlp.fc1_conv": (1024 + 64 + 128, 1024, 1024 * 16 * 2),
    "block.0.mlp.fc2_conv": (1024 + 16 + 32, 1024, 1024 * 16 * 2),
    "head": (80 + 5, 80, 80),
}


@pytest.mark.parametrize("spec,hand", [(CIFAR, HAND_CIFAR), (IMAGENET, HAND_IMAGENET)])
def test_params_memory_and_macs_equal_hand_computed(spec, hand):
    model = _model(spec, fire=False)
    table = M.layer_table(model)
    assert [r.name for r in table] == list(hand)
    for r in table:
        params, weights, macs = hand[r.name]
        assert (r.params, r.weights, r.macs) == (params, weights, macs), r.name
    n_params = sum(h[0] for h in hand.values())
    n_weights = sum(h[1] for h in hand.values())
    assert M.count_params(model) == n_params == sum(p.numel() for p in model.parameters())
    assert M.count_macs(model) == sum(h[2] for h in hand.values())
    assert M.memory_bytes(model) == {"fp32": 4 * n_params, "fp16": 2 * n_params,
                                     "int8": n_weights + 4 * (n_params - n_weights)}


def test_hand_totals_spelled_out():
    # the cifar numbers above, added up by hand once more
    assert M.count_params(_model(CIFAR, fire=False)) == 7600
    assert M.count_macs(_model(CIFAR, fire=False)) == 521376
    assert M.count_params(_model(IMAGENET, fire=False)) == 7503
    assert M.count_macs(_model(IMAGENET, fire=False)) == 1065040


class _ExecutedMacs(TorchFunctionMode):
    """Counts the multiply-accumulates the forward really executes, per weight layer and in matmuls."""

    def __init__(self, layer_of_storage):
        super().__init__()
        self.layer_of_storage, self.per_layer, self.matmul = layer_of_storage, {}, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (F.linear, F.conv1d, F.conv2d):
            w = args[1]
            name = self.layer_of_storage[w.untyped_storage().data_ptr()]
            self.per_layer[name] = self.per_layer.get(name, 0) + out.numel() * (w.numel() // w.shape[0])
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):  # `a @ b` arrives as Tensor.matmul
            self.matmul += out.numel() * args[0].shape[-1]
        return out


@pytest.mark.parametrize("spec", [CIFAR, IMAGENET])
def test_macs_equal_what_a_forward_executes(spec):
    # In train mode our stem runs the first conv on all T copies, as the reference does.
    model = _model(spec).train()
    modules = dict(model.named_modules())
    table = M.layer_table(model)
    storage = {modules[r.name].weight.untyped_storage().data_ptr(): r.name for r in table if r.type != "SpikeMatmul"}
    B = 3
    counter = _ExecutedMacs(storage)
    with torch.no_grad(), counter:
        model(_images(model, n=B))
    for r in table:
        if r.type != "SpikeMatmul":
            assert counter.per_layer[r.name] == B * r.macs, r.name
    assert counter.matmul == B * sum(r.macs for r in table if r.type == "SpikeMatmul")


def test_cheap_helpers_accept_configs_and_unequal_widths():
    model = _model(CIFAR, fire=False)
    cfg = model.cfg.to_dict()
    cfg.update(stem_widths=[3, 5, 7], blocks=[dict(heads=2, qk_dim=6, v_dim=10, mlp_hidden=20)])
    pruned = build_from_config({"family": "spikformer", "config": cfg})
    for helper in (M.count_params, M.memory_bytes, M.count_macs):
        assert helper(pruned) == helper(pruned.cfg) == helper(pruned.config_dict())
    assert M.count_params(pruned) == sum(p.numel() for p in pruned.parameters())
    assert M.count_macs(pruned) < M.count_macs(model)
    mm = next(r for r in M.layer_table(pruned) if r.type == "SpikeMatmul")
    assert mm.macs == 2 * 16 * 3 * 5 * 2 * 2  # head dims 3 (qk) and 5 (v)


def test_cheap_helpers_are_cheap():
    import time

    big = create_model("spikformer-8-512")
    t0 = time.perf_counter()
    for _ in range(20):
        M.count_params(big), M.memory_bytes(big), M.count_macs(big)
    per_call = (time.perf_counter() - t0) / 60
    assert per_call < 0.02, f"{per_call * 1e3:.2f} ms per call"  # about 0.1 ms here; no forward pass
    assert M.count_params(big) == 29_689_384


def test_model_that_disagrees_with_its_config_is_refused():
    model = _model(CIFAR, fire=False)
    model.block[0].mlp.fc1_linear = nn.Linear(16, 50)  # surgery that forgot to update the config
    with pytest.raises(SpikepruneError, match="fc1_linear"):
        M.measure(model, latency=False)


# -------------------------------------------------------------------------------------------------
# measure() with data
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [CIFAR, IMAGENET])
def test_rates_sops_and_energy(spec):
    model = _model(spec)
    images = _images(model)
    report = M.measure(model, data=images, latency=False, batch_size=5)
    rows = {r["name"]: r for r in report["layers"]}
    total = report["total"]
    assert total["rate_images"] == len(images)

    # input rates are the firing rates of the spikes each layer reads (one batch of all images)
    lif = spike_rates(model, images)
    kind = model.block[0].attn.kind
    assert rows[f"block.0.attn.proj_{kind}"]["input_rate"] == pytest.approx(lif["block.0.attn.attn_lif"])
    assert rows[f"block.0.mlp.fc2_{kind}"]["input_rate"] == pytest.approx(lif["block.0.mlp.fc1_lif"])
    rq, rk = lif["block.0.attn.q_lif"], lif["block.0.attn.k_lif"]
    assert rows["block.0.attn.matmul"]["input_rate"] == pytest.approx((rq + rk) / 2)
    if model.cfg.layout == "cifar":  # no pool between stem stages 1 and 2
        assert rows["patch_embed.proj_conv1"]["input_rate"] == pytest.approx(lif["patch_embed.proj_lif"])
    else:  # max-pooled spikes: still binary, denser than the LIF output
        assert rows["patch_embed.proj_conv1"]["input_rate"] >= lif["patch_embed.proj_lif"]

    for r in report["layers"]:
        if r["input"] == "spikes":
            assert r["op"] == "AC"
            assert 0 < r["input_rate"] < 1, r["name"]  # the neurons fire: the check below is not vacuous
            assert r["sops"] == pytest.approx(r["input_rate"] * r["macs"])
            assert r["sops"] <= r["macs"]
            assert r["energy_mj"] == pytest.approx(0.9e-9 * r["sops"])
        else:
            assert r["op"] == "MAC" and r["sops"] is None and r["input_rate"] is None
    assert [r["name"] for r in report["layers"] if r["input"] != "spikes"] == [
        "patch_embed.proj_conv", f"block.0.attn.q_{kind}", f"block.0.attn.k_{kind}", f"block.0.attn.v_{kind}",
        f"block.0.mlp.fc1_{kind}", "head"]

    # the spec's energy formula, from the rows: first conv once per image, other MACs, then SOPs
    T = model.cfg.T
    first = rows["patch_embed.proj_conv"]["macs"] // T
    other_macs = sum(r["macs"] for r in report["layers"] if r["input"] == "real")
    sops = sum(r["sops"] for r in report["layers"] if r["sops"] is not None)
    assert total["energy_mj"] == pytest.approx((4.6 * (first + other_macs) + 0.9 * sops) * 1e-9)
    assert total["sops"] == pytest.approx(sops)
    assert total["sops"] < total["macs"]


def test_per_layer_rows_sum_to_totals():
    model = _model(IMAGENET)
    report = M.measure(model, data=_images(model), repeats=2, warmup=1)
    t, layers = report["total"], report["layers"]
    assert t["params"] == sum(r["params"] for r in layers) == M.count_params(model)
    assert t["macs"] == sum(r["macs"] for r in layers) == M.count_macs(model)
    for k in ("fp32", "fp16", "int8"):
        assert t["memory_bytes"][k] == sum(r["memory_bytes"][k] for r in layers) == M.memory_bytes(model)[k]
    assert t["sops"] == pytest.approx(sum(r["sops"] or 0 for r in layers))
    assert t["energy_mj"] == pytest.approx(sum(r["energy_mj"] for r in layers))
    assert t["memory_bytes"]["fp16"] * 2 == t["memory_bytes"]["fp32"]
    # int8: 1 B per weight, 4 B per bias / BN parameter: above 1 B per parameter, below fp16 here
    assert t["params"] < t["memory_bytes"]["int8"] < t["memory_bytes"]["fp16"]
    json.dumps(report)  # plain data


def test_notes_say_what_is_not_counted():
    report = M.measure(_model(CIFAR), latency=False)
    notes = " ".join(report["notes"])
    assert "norm1/norm2" in notes and "not counted" in notes
    assert "first conv" in notes and "residual" in notes and "head" in notes
    assert "no data given" in notes
    assert report["total"]["sops"] is None and report["total"]["energy_mj"] is None
    assert all(r["sops"] is None and r["energy_mj"] is None for r in report["layers"])


def test_latency_is_measured_and_model_state_restored():
    model = _model(CIFAR).train()
    report = M.measure(model, latency=True, latency_batch=2, repeats=3, warmup=1)
    t = report["total"]
    assert t["latency_ms"] > 0 and t["latency_ms_min"] <= t["latency_ms"]
    assert (t["latency_batch"], t["latency_repeats"], t["latency_device"]) == (2, 3, "cpu")
    assert model.training  # measure switched to eval for the forwards and back afterwards
    assert len(M.time_forward(model.eval(), _images(model, n=1), repeats=4, warmup=0)) == 4


def test_data_as_dataset_loader_and_spec():
    from spikeprune.data import dataset_for_model, make_loader

    model = _model(CIFAR)
    ds = dataset_for_model("digits", model, split="calib")
    by_ds = M.measure(model, data=ds, max_images=20, batch_size=8, latency=False)
    by_loader = M.measure(model, data=make_loader(ds, batch_size=8), max_images=20, latency=False)
    by_spec = M.measure(model, data="digits", split="calib", max_images=20, batch_size=8, latency=False)
    images = torch.stack([ds[i][0] for i in range(20)])
    by_tensor = M.measure(model, data=images, latency=False)
    for rep in (by_ds, by_loader, by_spec):
        assert rep["total"]["rate_images"] == 20
        assert rep["total"]["sops"] == pytest.approx(by_tensor["total"]["sops"])


def test_bad_inputs():
    model = _model(CIFAR)
    with pytest.raises(SpikepruneError, match="model takes"):
        M.measure(model, data=torch.rand(4, 1, 28, 28), latency=False)
    with pytest.raises(SpikepruneError, match="no images"):
        M.measure(model, data=torch.rand(0, 1, 16, 16), latency=False)
    with pytest.raises(SpikepruneError, match="at least 1"):
        M.measure(model, repeats=0)
    with pytest.raises(SpikepruneError, match="no model family for a Linear"):
        M.count_params(nn.Linear(3, 4))
    if not torch.cuda.is_available():
        with pytest.raises(SpikepruneError, match="no CUDA"):
            M.measure(model, device="cuda")


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------
ARGS = ["spikformer-1-32-digits", "--set", "embed_dim=16", "--set", "num_heads=2", "--set", "T=2",
        "--max-images", "test=16", "--latency-repeats", "2", "--latency-warmup", "1"]


def _run_measure_command(argv, capsys):
    """The measure sub-command on its own parser (independent of the other commands' registration)."""
    parser = argparse.ArgumentParser(prog="spikeprune")
    register_measure(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["measure", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_cli_json_is_one_parseable_object(capsys):
    out = _run_measure_command([*ARGS, "--data", "digits", "--json"], capsys)
    report = json.loads(out)
    assert report["total"]["params"] == 7600
    assert report["total"]["sops"] is not None and report["total"]["latency_ms"] > 0
    assert len(report["layers"]) == 13


def test_cli_table_is_readable(capsys):
    out = _run_measure_command([*ARGS, "--data", "digits", "--no-latency"], capsys)
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["layer", "type", "params", "fp32", "mem"]
    assert any(line.startswith("block.0.attn.matmul") for line in lines)
    assert "params     0.0076 M (7,600)" in out
    assert "MACs       0.0005 G per image (T=2)" in out
    assert "energy" in out and "mJ per image" in out and "latency" not in out.split("notes:")[0]
    widths = {len(line) for line in lines[: lines.index(next(x for x in lines if x.startswith("params")))]}
    assert len(widths) == 1  # fixed-width columns: every table line has the same length


def test_cli_through_main(capsys):
    from spikeprune.cli import main

    assert main(["measure", *ARGS, "--json", "--no-latency"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["sops"] is None  # no --data: sizes and MACs only
    assert report["total"]["latency_ms"] is None


def test_cli_bad_data_is_a_clear_error(capsys):
    with pytest.raises(SpikepruneError, match="1-channel images but the model takes 3"):
        _run_measure_command(["spikformer-4-384", "--data", "digits", "--no-latency"], capsys)


# -------------------------------------------------------------------------------------------------
# Interleaved latency
# -------------------------------------------------------------------------------------------------
def test_latency_is_timed_interleaved_with_its_spread_and_a_verdict(monkeypatch):
    calls = []

    class Named(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    models = {"dense": Named("dense"), "pruned": Named("pruned")}
    monkeypatch.setattr(M, "_load_per_cpu", lambda: 0.1)
    r = M.interleaved_latency(models, torch.zeros(1, 1, 4, 4), repeats=4, warmup=1)
    timed = calls[2:]  # after one warm-up forward each
    assert timed == ["dense", "pruned", "pruned", "dense", "dense", "pruned", "pruned", "dense"]  # order rotates
    for name in models:
        t = r["models"][name]
        assert t["latency_ms_q1"] <= t["latency_ms"] <= t["latency_ms_q3"] and t["latency_spread"] >= 0
    assert r["interleaved"] and r["load_per_cpu"] == 0.1
    monkeypatch.setattr(M, "_load_per_cpu", lambda: 3.0)  # three runnable processes per CPU: timings compete
    busy = M.interleaved_latency(models, torch.zeros(1, 1, 4, 4), repeats=2, warmup=0)
    assert not busy["reliable"] and "busy" in busy["why"][-1]


def test_the_summary_table_marks_unreliable_latency():
    from spikeprune.report import format_summary_table
    row = {"top1": 0.9, "params": 10, "memory_bytes": {"fp32": 40, "int8": 10}, "macs": 5, "energy_mj": 0.1,
           "latency_ms": 2.0, "latency_spread": 0.5, "latency_reliable": False}
    summary = {"policy": "uniform", "constraints_met": True, "constraint_checks": {"acc_drop_calib": 0.0},
               "constraints": {"max_acc_drop": 3}, "memory_saved": 0.1, "dense": row, "pruned": row,
               "latency": {"reliable": False, "why": ["the machine was busy"]}, "wall_time_s": 1.0}
    text = format_summary_table(summary)
    assert "±25% ?" in text  # the figure, half its interquartile range, and the mark
    assert "latency unreliable: the machine was busy" in text
