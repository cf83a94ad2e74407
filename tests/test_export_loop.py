"""export(time_loop="loop"): the time steps as one ONNX Loop. The Loop file computes the model's
classes (both families, fp32 and int4, spikes compared inside the Loop), its graph does not grow
with T and is smaller than the unrolled one, its bytes reconcile term by term, and a model that
cannot be written one step at a time is refused with no file left."""
from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from spiking_helpers import randomise  # noqa: E402

from spikeprune import deploy as ex  # noqa: E402
from spikeprune.deploy.loop import step_bodies  # noqa: E402
from spikeprune.errors import SpikepruneError  # noqa: E402
from spikeprune.models import create_model  # noqa: E402

PRESETS = {"spikformer": ("spikformer-1-32-digits", dict(embed_dim=16, num_heads=2)),
           "sdt": ("sdt-1-64-mnist", dict(embed_dim=16, num_heads=2, img_size=16, pool_after="1010"))}


def _tiny(family: str, T: int = 2, seed: int = 0, **overrides):
    name, sizes = PRESETS[family]
    torch.manual_seed(seed)
    return randomise(create_model(name, **{**sizes, "T": T, **overrides}), seed).eval()


def _images(model, n=5, seed=1):
    c = model.cfg
    return torch.randn(n, c.in_channels, c.img_size, c.img_size, generator=torch.Generator().manual_seed(seed))


def _export(model, path, **kw):
    return ex.export(model, path, **{"input": "normalised", "progress": False, "max_images": 12,
                                     "keep_inaccurate": True, **kw})


def _classes(path, images):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"images": images.numpy()})[0]).argmax(1)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("family", ["spikformer", "sdt"])
def test_the_loop_file_computes_the_models_classes(tmp_path, family, precision):
    model = _tiny(family)
    reports = {tl: _export(model, tmp_path / f"{tl}.onnx", precision=precision, time_loop=tl)
               for tl in ex.TIME_LOOPS}
    proto = onnx.load(str(tmp_path / "loop.onnx"))
    assert [n.op_type for n in proto.graph.node if n.op_type not in ("Constant", "DequantizeLinear")] == [
        "Loop", "ReduceMean"]
    assert {p.key: p.value for p in proto.metadata_props}["spikeprune.time_loop"] == "loop"
    (body,) = step_bodies(proto)
    if precision == "int4":  # int4 / int8 weights stay in the main graph, dequantised once per call
        dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
        assert dq and reports["loop"]["opset"] == ex.INT4_OPSET
        assert not any(n.op_type == "DequantizeLinear" for n in body.node)
        assert {i.name for i in proto.graph.initializer} == {i for n in dq for i in n.input}
    else:  # every constant in the body, where the runtime prepares its weights for its kernels
        assert len(proto.graph.initializer) == 0 and len(body.initializer) > 0
    c, u = reports["loop"]["check"], reports["unrolled"]["check"]
    # the check read every fire decision inside the Loop, as many as the unrolled file has
    assert c["spikes"]["comparable"] and c["spikes"]["decisions"] == u["spikes"]["decisions"] > 0
    assert c["spikes"]["graph_decisions"] == u["spikes"]["graph_decisions"]
    assert c["spikes"]["images_differing_without_flips"] == 0
    assert c["class_agreement"] >= 1 - c["spikes"]["images_with_flips"] / c["images"]
    sw = reports["loop"]["stepwise"]
    assert sw["max_abs_logit_diff"] <= 1e-9 * (1 + sw["max_abs_logit"])
    rec = reports["loop"]["memory"]["reconciliation"]
    assert rec["unaccounted"] == 0 and all(t["counted"] == t["in_file"] for t in rec["terms"])
    assert rec["counted"] + sum(rec["outside_count"].values()) == (tmp_path / "loop.onnx").stat().st_size
    images = _images(model, 5)
    assert torch.equal(_classes(tmp_path / "loop.onnx", images), _classes(tmp_path / "unrolled.onnx", images))
    if precision == "fp32":
        with torch.no_grad():
            assert torch.equal(_classes(tmp_path / "loop.onnx", images), model(images).argmax(1))


def test_the_loop_graph_is_smaller_and_does_not_grow_with_T(tmp_path):
    graph = {}
    for T in (2, 4):
        model = _tiny("spikformer", T=T)
        for tl in ex.TIME_LOOPS:
            r = _export(model, tmp_path / f"{tl}{T}.onnx", time_loop=tl, check=False)
            graph[tl, T] = r["memory"]["file"]["graph"]
    assert graph["loop", 4] == graph["loop", 2]  # only the trip count (an int64) differs
    fixed = _export(model, tmp_path / "fixed.onnx", time_loop="loop", batch=2)  # T=4, a fixed batch of 2
    assert "fixed batch of 2" in fixed["loop_body"] and fixed["check"]["batch_sizes"] == [2]
    assert fixed["check"]["class_agreement"] == 1.0 and fixed["check"]["spikes"]["comparable"]
    assert graph["unrolled", 4] > graph["unrolled", 2] > graph["loop", 2]


def test_a_model_that_cannot_run_one_step_at_a_time_is_refused(tmp_path):
    from test_tracing import _hierarchical

    import spikeprune as sp

    model, x = _hierarchical()
    sp.trace(model, x)  # the traced family: the user's module runs its own time loop
    with pytest.raises(SpikepruneError, match="cannot be written as one ONNX Loop.*time_loop='unrolled'"):
        _export(model, tmp_path / "traced.onnx", time_loop="loop")
    # a family that says it can, but whose neurons keep state the twin does not carry (PLIF): the
    # float64 proof refuses it
    plif = _tiny("sdt", spike_mode="plif")
    with pytest.raises(SpikepruneError, match="cannot be written as one time step"):
        _export(plif, tmp_path / "plif.onnx", time_loop="loop")
    with pytest.raises(SpikepruneError, match="unknown time loop"):
        _export(_tiny("spikformer"), tmp_path / "x.onnx", time_loop="scan")
    assert list(tmp_path.iterdir()) == []


def test_the_time_loop_flag(tmp_path, capsys):
    from spikeprune.cli import main

    out = tmp_path / "cli.onnx"
    args = ["export", "spikformer-1-32-digits", "--set", "embed_dim=16", "--set", "num_heads=2", "--set", "T=2",
            "-o", str(out), "--random-weights", "--normalisation", "digits", "--max-images", "calib=6"]
    assert main(args + ["--time-loop", "loop"]) == 0
    printed = capsys.readouterr().out
    assert "T=2 in one ONNX Loop" in printed and "one time step as the body of one ONNX Loop" in printed
    assert any(n.op_type == "Loop" for n in onnx.load(str(out)).graph.node)
    assert main(args + ["--force"]) == 0 and "T=2 unrolled" in capsys.readouterr().out  # the default
    assert not any(n.op_type == "Loop" for n in onnx.load(str(out)).graph.node)
    with pytest.raises(SystemExit):
        main(args + ["--force", "--time-loop", "scan"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_body_takes_any_batch_size_and_is_traced_dynamic_where_it_cannot_be_generalised(tmp_path, monkeypatch):
    from onnx import TensorProto, helper

    from spikeprune.deploy import loop

    model = _tiny("spikformer")
    r = _export(model, tmp_path / "loop.onnx", time_loop="loop")
    assert "generalised" in r["loop_body"]
    for n in (1, 2, 7):  # neither sentinel batch: the generalised constants hold
        images = _images(model, n, seed=n)
        with torch.no_grad():
            assert torch.equal(_classes(tmp_path / "loop.onnx", images), model(images).argmax(1))

    def graph(a: int, target: list[int]):
        shape = helper.make_node("Constant", [], ["s"], value=helper.make_tensor("", TensorProto.INT64, [len(target)],
                                                                                 target))
        return helper.make_model(helper.make_graph(
            [shape, helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [a, 4, 6])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))

    a, b = loop.SENTINEL_BATCHES
    ok = loop.batch_free(graph(a, [a, 24]), graph(b, [b, 24]))  # the input's dim 0 is the batch: copied (0)
    assert list(onnx.numpy_helper.to_array(ok.graph.node[0].attribute[0].t)) == [0, 24]
    assert ok.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert loop.batch_free(graph(a, [4 * a, 6]), graph(b, [4 * b, 6])) is None  # batch x 4: not a batch position
    # a body that cannot be generalised is traced with a dynamic batch, and still computes the model
    monkeypatch.setattr(ex, "batch_free", lambda *protos: None)
    r = _export(model, tmp_path / "dynamic.onnx", time_loop="loop")
    assert "dynamic batch" in r["loop_body"] and r["check"]["class_agreement"] == 1.0
    shape_ops = {name: sum(n.op_type in ("Shape", "Gather", "Unsqueeze", "Concat") for b in step_bodies(
        onnx.load(str(tmp_path / name))) for n in b.node) for name in ("loop.onnx", "dynamic.onnx")}
    assert shape_ops["dynamic.onnx"] > 2 * shape_ops["loop.onnx"]  # the shape arithmetic a dynamic trace writes
    assert (tmp_path / "dynamic.onnx").stat().st_size > (tmp_path / "loop.onnx").stat().st_size


def test_the_time_loop_bench_runs_end_to_end(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_time_loop", Path(__file__).resolve().parent.parent / "bench" / "time_loop.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        res = bench.main(["--repeats", "1", "--warmup", "0", "--check-images", "4",
                          "--models", "sdt-1-64-mnist:mnist5k", "--sweep-model", "sdt-1-64-mnist:mnist5k", "--sweep-T", "1,3", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    files = res["results"][0]["files"]
    assert files["fp32/loop"]["graph_bytes"] < files["fp32/unrolled"]["graph_bytes"]
    assert all(f["reconciled"] and f["check"]["comparable"] for f in files.values())
    assert set(res["results"][0]["latency"]) == {"fp32/1", "fp32/64", "int4/1", "int4/64"}
    sweep = {row["T"]: row for row in res["t_sweep"]}
    assert sweep[1]["loop/dynamic"] == sweep[3]["loop/dynamic"]
    assert sweep[3]["unrolled/dynamic"] > sweep[1]["unrolled/dynamic"]
    assert json.loads((tmp_path / "time-loop.json").read_text())["results"][0]["model"] == "sdt-1-64-mnist"
    assert "| sdt-1-64-mnist |" in bench.docs_table(res) and "## Bytes" in (tmp_path / "time-loop.md").read_text()
