"""Per-layer weight precision (spikeprune.precision, spikeprune.quantise) and the files it gives:
bytes counted as the file holds them, int4 packed in an opset-21 file ONNX Runtime runs and that
computes the fake-quantised model exactly, the raw-pixel input, the accuracy gate in image counts,
and the export's up-front refusals and leftover clean-up."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from spiking_helpers import randomise

from spikeprune import precision as P
from spikeprune import quantise as Q
from spikeprune.costs import budget_bytes
from spikeprune.errors import SpikepruneError
from spikeprune.models import create_model
from spikeprune.policy_api import Constraints
from spikeprune.surgery import prune


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = create_model("spikformer-1-32-digits", **{"embed_dim": 32, "num_heads": 4, "T": 2, **overrides})
    return randomise(model, seed).eval()


# ------------------------------------------------------------------------------------------------
# Plans and bytes
# ------------------------------------------------------------------------------------------------
def test_plans_keep_the_ends_wider_and_refuse_what_they_cannot_place():
    model = _tiny()
    layers = [r.name for r in P.weight_layers(model)]
    plan = P.resolve_plan(model, "int4")
    assert plan[layers[0]] == plan[layers[-1]] == "int8" and set(plan[n] for n in layers[1:-1]) == {"int4"}
    assert set(P.resolve_plan(model, "int4", ends="int4").values()) == {"int4"}
    mixed = P.resolve_plan(model, {"block.*": "int4", "*": "fp16"})
    assert mixed[layers[0]] == "fp16" and all(v == "int4" for k, v in mixed.items() if k.startswith("block."))
    for bad, match in [({"block.*": "int4"}, "no precision for layer"), ({"nope*": "int8", "*": "fp32"}, "match no"),
                       ("int3", "unknown weight precision")]:
        with pytest.raises(SpikepruneError, match=match):
            P.resolve_plan(model, bad)
    with pytest.raises(SpikepruneError, match="narrower"):
        P.resolve_plan(model, "int8", ends="int4")


def test_file_bytes_count_packed_int4_scales_and_zero_points():
    model = _tiny()
    table = P.weight_layers(model)
    fb = P.file_weight_bytes(model, "int4", ends="int4")
    for row, r in zip(fb["layers"], table):
        c = r.weight_shape[0]
        biases = c if (r.bias or r.bn) else 0
        assert row["weights"] == (r.weights + 1) // 2 and row["scales"] == 4 * c
        assert row["zero_points"] == (c + 1) // 2 and row["biases"] == 4 * biases
    assert fb["share_of_weights"]["int4"] == 1 and fb["total"] == sum(row["bytes"] for row in fb["layers"])
    # int8 agrees with the deployed count the int8 export has always reconciled with
    from spikeprune.costs import deployed_memory_bytes
    assert P.file_weight_bytes(model, "int8")["total"] == deployed_memory_bytes(model)["int8"]
    assert P.file_weight_bytes(model, "fp32")["total"] == deployed_memory_bytes(model)["fp32"]
    # a model that carries a plan is counted at it
    assert budget_bytes(model, "file-int8") == deployed_memory_bytes(model)["int8"]
    Q.apply_plan(model, "int4")
    assert budget_bytes(model, "file-int8") == P.file_weight_bytes(model, "int4")["total"]
    assert budget_bytes(model, "fp32") == 4 * sum(p.numel() for p in model.parameters())


def test_a_memory_budget_can_count_file_bytes():
    model = _tiny()
    dense = budget_bytes(model, "file-int4")
    c = Constraints(max_acc_drop=1, target_saving=0.5, precision="file-int4").resolve(dense, dense // 10)
    assert c.budget_bytes == dense // 2 and c.precision == "file-int4"
    with pytest.raises(SpikepruneError, match="--precision"):
        Constraints(precision="int4-ish")


# ------------------------------------------------------------------------------------------------
# Fake quantisation and the straight-through estimator
# ------------------------------------------------------------------------------------------------
def test_quantised_weights_are_on_a_symmetric_per_channel_grid():
    w = torch.randn(6, 5, 3)
    w[2] = 0
    for p, q in (("int8", 127), ("int4", 7)):
        wq = Q.quantise_weights(w, p)
        scale = w.reshape(6, -1).abs().amax(1).clamp_min(1e-30) / q
        codes = wq.reshape(6, -1) / scale[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= q + 1e-4
        assert torch.all(wq[2] == 0)
        assert torch.equal(Q.quantise_weights(wq, p), wq) or torch.allclose(Q.quantise_weights(wq, p), wq, atol=1e-7)


def test_quantisation_aware_training_passes_gradients_straight_through():
    model = _tiny()
    images = torch.randn(3, 1, 16, 16)
    with Q.quantisation_aware(model, "int4") as plan:
        assert all(p in ("int4", "int8") for p in plan.values())
        model.train()
        model(images).sum().backward()
        name = next(n for n, p in plan.items() if p == "int4")
        w = model.get_submodule(name).weight
        assert w.grad is not None and w.grad.abs().sum() > 0  # the fp32 weights get the gradient
        assert not torch.allclose(Q.quantise_weights(w, "int4"), w)  # ... and stay fp32 between steps
        assert set(model.state_dict()) == set(_tiny().state_dict())  # checkpoints keep their keys
        # the gradient is the one at the quantised weights (straight through the rounding)
        ref = _tiny()
        ref.load_state_dict(model.state_dict())
        with torch.no_grad():
            for n, p in plan.items():
                ref.get_submodule(n).weight.copy_(Q.quantise_weights(ref.get_submodule(n).weight, p))
        ref.train()
        ref(images).sum().backward()
        assert torch.allclose(ref.get_submodule(name).weight.grad, w.grad, atol=1e-6)
    # leaving the block leaves plain weights on the grid, and the plan on the model
    wq = model.get_submodule(name).weight
    assert torch.allclose(Q.quantise_weights(wq, plan[name]), wq, atol=1e-7)
    assert P.model_plan(model) == plan


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from spikeprune import deploy as ex  # noqa: E402


def test_int4_file_is_packed_runs_and_computes_the_fake_quantised_model(tmp_path):
    model = prune(_tiny(), {"block*.mlp.hidden": 0.5}).eval()
    path = tmp_path / "m4.onnx"
    report = ex.export(model, path, precision="int4", normalisation="digits", max_images=12, progress=False)
    proto = onnx.load(str(path))
    assert report["opset"] == ex.INT4_OPSET == {o.domain: o.version for o in proto.opset_import}[""]
    inits = {i.name: i for i in proto.graph.initializer}
    fb = P.file_weight_bytes(model, "int4")
    int4 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert sum(len(i.raw_data) for i in int4 if i.name.endswith("__int4")) == sum(
        r["weights"] for r in fb["layers"] if r["precision"] == "int4")
    rec = report["memory"]["reconciliation"]
    assert rec["counted"] == fb["total"] and rec["unaccounted"] == 0
    assert all(t["counted"] == t["in_file"] for t in rec["terms"])
    assert rec["counted"] + sum(rec["outside_count"].values()) == path.stat().st_size
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert {inits[n.input[0]].data_type for n in dq} == {onnx.TensorProto.INT4, onnx.TensorProto.INT8}
    c = report["check"]
    assert c["reference"].startswith("the fake-quantised model") and c["spikes"]["comparable"]
    assert c["spikes"]["images_differing_without_flips"] == 0 and c["class_agreement"] >= 1 - \
        c["spikes"]["images_with_flips"] / c["images"]
    meta = ex.file_metadata(path)
    assert json.loads(meta["weight_precision"]) == fb["plan"]


def test_pack_int4_order_round_trips_through_onnx():
    from onnx import TensorProto, helper, numpy_helper

    from spikeprune.deploy.graph import pack_int4
    values = np.array([[-7, 3, 0], [7, -1, 5]], np.int8)
    t = helper.make_tensor("t", TensorProto.INT4, values.shape, pack_int4(values), raw=True)
    assert len(t.raw_data) == 3 and np.array_equal(numpy_helper.to_array(t).astype(np.int8), values)


def test_the_file_takes_raw_pixels_and_says_so(tmp_path, trained_tiny):
    from spikeprune.data import dataset_for_model

    path = tmp_path / "raw.onnx"
    report = ex.export(trained_tiny, path, data="digits", max_images=40, check_split="test", progress=False)
    assert "digits:test" in report["check"]["source"]
    pre = json.loads(ex.file_metadata(path)["preprocessing"])
    assert pre["input"] == "raw" and pre["mean"] == [0.3053] and pre["std"] == [0.3189]
    assert report["check"]["input"] == "raw pixels in [0, 1]"
    test = dataset_for_model("digits", trained_tiny, split="test", max_images=120)
    idx = list(range(len(test)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": test.pixels(idx).numpy()})[0].argmax(1)
    images, labels = test.batch(idx)
    with torch.no_grad():
        want = trained_tiny(images).argmax(1).numpy()
    assert (got == want).mean() >= 0.97  # the same classes, up to float32 threshold ties
    assert abs((got == labels.numpy()).mean() - (want == labels.numpy()).mean()) <= 0.03
    # the older behaviour on request: normalised images in, the normalisation recorded when known
    ex.export(trained_tiny, tmp_path / "norm.onnx", input="normalised", normalisation="digits", check=False,
              progress=False)
    pre = json.loads(ex.file_metadata(tmp_path / "norm.onnx")["preprocessing"])
    assert pre["input"] == "normalised" and pre["mean"] == [0.3053]
    with pytest.raises(SpikepruneError, match="normalisation is not known"):
        ex.export(trained_tiny, tmp_path / "x.onnx", check=False, progress=False)


def test_the_gate_compares_image_counts():
    def report(fp32_hits, onnx_hits, n=500):
        return {"precision": "int8", "weight_precision": {"a": "int8"}, "warnings": [],
                "check": {"labelled": n, "hits": {"fp32": fp32_hits, "onnx": onnx_hits, "reference": onnx_hits},
                          "top1_torch": fp32_hits / n, "top1_onnx": onnx_hits / n, "source": "500 images"}}
    assert 100 * (382 / 500 - 377 / 500) > 1.0  # the float comparison that refused an exact 1-point drop
    ex._accuracy_gate(report(382, 377), 1.0, keep=False)  # 5 of 500 images: exactly 1 point, allowed
    ex._accuracy_gate(report(382, 381), 0.2, keep=False)  # 1 of 500 = 0.2 points
    with pytest.raises(SpikepruneError, match="6 of 500 images, 1.20 points lower"):
        ex._accuracy_gate(report(382, 376), 1.0, keep=False)


def test_bad_export_options_are_refused_up_front(tmp_path, capsys):
    from spikeprune.cli import main

    model = _tiny()
    for bad in (float("nan"), float("inf"), -1, "x"):
        with pytest.raises(SpikepruneError, match="max_drop"):
            ex.export(model, tmp_path / "x.onnx", max_drop=bad, normalisation="digits", progress=False)
    with pytest.raises(SpikepruneError, match="check_split"):
        ex.export(model, tmp_path / "x.onnx", check_split="train", normalisation="digits", progress=False)
    with pytest.raises(SystemExit) as stop:
        main(["export", "spikformer-1-32-digits", "-o", str(tmp_path / "x.onnx"), "--max-drop", "nan"])
    assert stop.value.code == 2
    assert "--max-drop" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_killed_exports_leftovers_are_removed_by_the_next(tmp_path):
    model = _tiny()
    legacy = tmp_path / ".m.onnx.k2j4x_q.partial"  # the name earlier versions used
    dead = tmp_path / ".m.onnx.999999999-abc.tmp"  # a process that no longer runs
    other = tmp_path / ".other.onnx.k2j4x_q.partial"  # another file's: left alone
    for p in (legacy, dead, other):
        p.write_bytes(b"half a file")
    ex.export(model, tmp_path / "m.onnx", normalisation="digits", check=False, progress=False)
    assert sorted(os.listdir(tmp_path)) == [".other.onnx.k2j4x_q.partial", "m.onnx"]


def test_a_precision_the_runtime_cannot_run_is_an_error_not_a_silent_file(tmp_path, monkeypatch):
    real = ort.InferenceSession

    def no_int4(model_bytes, *a, **kw):
        if isinstance(model_bytes, bytes) and b"__int4" in model_bytes:
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
                               "DequantizeLinear(21) node with name ''")
        return real(model_bytes, *a, **kw)

    monkeypatch.setattr(ort, "InferenceSession", no_int4)
    with pytest.raises(SpikepruneError, match=r"ONNX Runtime .* cannot run this mixed .*int4.*NOT_IMPLEMENTED"):
        ex.export(_tiny(), tmp_path / "m4.onnx", precision="int4", normalisation="digits", max_images=4,
                  progress=False)
    assert os.listdir(tmp_path) == []


def test_sizes_by_precision_in_measure_inspect_and_a_saved_model(tmp_path):
    from spikeprune.costs import format_report, measure
    from spikeprune.inspect import format_report as format_inspect, inspect_model
    from spikeprune.serialization import load_model, save_model

    model = Q.apply_plan(_tiny(), "int4")
    save_model(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q")
    assert P.model_plan(loaded) == P.model_plan(model)
    fb = P.file_weight_bytes(loaded)
    m = measure(loaded, latency=False)
    plan = m["total"]["file_bytes"]["plan"]
    assert plan["quantised"] and plan["total"] == fb["total"] and plan["by_precision"]["int4"] > 0
    assert 0 < plan["share_of_weights"]["int4"] < 1 and plan["share_of_weights"]["int8"] > 0
    rows = [r for r in m["layers"] if r["file_bytes"]]
    assert [r["file_bytes"]["precision"] for r in rows] == [row["precision"] for row in fb["layers"]]
    assert all(r["file_bytes"]["int4"] < r["file_bytes"]["int8"] < r["file_bytes"]["fp32"] for r in rows)
    assert "this model's weights" in format_report(m) and "int4" in format_report(m)
    ins = inspect_model(loaded)
    assert {ly["precision"] for ly in ins["layers"]} == {"int4", "int8"}
    assert ins["total"]["file_bytes"]["plan"]["total"] == fb["total"] and "bits per weight" in format_inspect(ins)


def test_the_graph_keeps_one_constant_per_value(tmp_path):
    from spikeprune.deploy.fold import fold_batchnorm
    from spikeprune.deploy.graph import dedupe_constants, trace_to_onnx

    model = _tiny()
    proto = trace_to_onnx(fold_batchnorm(model)[0], "spikformer", 17)
    before = [n for n in proto.graph.node if n.op_type == "Constant"]
    removed = dedupe_constants(proto)
    after = [n for n in proto.graph.node if n.op_type == "Constant"]
    values = [n.attribute[0].SerializeToString() for n in after]
    assert removed > 0 and len(after) == len(before) - removed and len(set(values)) == len(values)
    onnx.checker.check_model(proto)
    # the same function: the exported file (which merges them) against the model, spike by spike
    report = ex.export(model, tmp_path / "m.onnx", input="normalised", max_images=8, progress=False)
    assert report["check"]["spikes"]["images_differing_without_flips"] == 0 and report["check"]["class_agreement"] == 1


def test_a_fixed_batch_makes_the_graph_smaller(tmp_path):
    model = _tiny()
    dyn = ex.export(model, tmp_path / "d.onnx", normalisation="digits", max_images=8, progress=False)
    fixed = ex.export(model, tmp_path / "f.onnx", normalisation="digits", max_images=9, batch=4, progress=False)
    assert fixed["memory"]["file"]["graph"] < 0.8 * dyn["memory"]["file"]["graph"]
    assert fixed["check"]["batch_sizes"] == [4] and fixed["check"]["images"] == 8  # whole batches only
    assert fixed["check"]["spikes"]["images_differing_without_flips"] == 0
    assert ex.file_metadata(tmp_path / "f.onnx")["batch"] == "4"
    sess = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):  # the file runs at its batch size only
        sess.run(None, {"images": np.zeros((3, 1, 16, 16), np.float32)})
    with pytest.raises(SpikepruneError, match="batch"):
        ex.export(model, tmp_path / "x.onnx", normalisation="digits", batch=0, progress=False)
