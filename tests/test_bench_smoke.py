"""The latency benchmark's main function runs end to end on tiny models, so it cannot rot."""
import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "latency.py"


def test_latency_bench_quick_run(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_latency", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--repeats", "2", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "latency-quick.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [c["preset"] for c in saved["cases"]] == ["spikformer-4-384", "spikformer-8-512"]
    for case in saved["cases"]:
        assert case["ours_ms"] > 0 and case["reference_ms"] > 0 and case["T"] == 4
        assert case["max_abs_logit_diff"] < 1e-3  # same weights, same function
    md = (tmp_path / "latency-quick.md").read_text()
    assert "spikformer-8-512" in md and saved["command"] in md and "speed-up" in md


def test_split_gap_bench_reports_each_models_drop_on_both_whole_splits(tmp_path):
    from spikeprune.models import create_model
    from spikeprune.serialization import save_model
    from spikeprune.surgery import prune

    spec = importlib.util.spec_from_file_location("bench_split_gap", BENCH.parent / "split_gap.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    dense = create_model("spikformer-1-32-digits").eval()
    save_model(dense, tmp_path / "dense")
    save_model(prune(dense, {"residual": 0.5}), tmp_path / "half")
    threads = torch.get_num_threads()
    try:
        assert bench.main([str(tmp_path / "dense"), f"half={tmp_path / 'half'}", "--data", "digits",
                           "--out", str(tmp_path / "out")]) == 0
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "out" / "split_gap.json").read_text())
    dense_row, half = saved["rows"]
    assert dense_row["calib"]["drop"] == 0 and dense_row["test"]["drop"] == 0
    assert half["calib"]["n"] == 180 and half["test"]["n"] == 359  # the whole digits splits, uncapped
    assert half["test"]["drop"] == (dense_row["test"]["top1"] - half["test"]["top1"]) * 100
    md = (tmp_path / "out" / "split_gap.md").read_text()
    assert "| half |" in md and saved["command"] in md


def test_bytes_bench_rows_and_table(tmp_path, trained_tiny):
    """bench/bytes.py's export-and-check row and its table, on the tiny model (the policy runs it
    chains are the prune runs tested elsewhere)."""
    from spikeprune.data import dataset_for_model
    from spikeprune.quantise import apply_plan

    spec = importlib.util.spec_from_file_location("bench_bytes", BENCH.parent / "bytes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    test = dataset_for_model("digits", trained_tiny, "test", max_images=40)
    dense = bench.file_row(trained_tiny, "dense", "digits", tmp_path, "fp32", test, 20)
    q = apply_plan(trained_tiny, "int4")
    row = bench.file_row(q, "q", "digits", tmp_path, None, test, 20)
    assert row["weight_bytes"] + row["graph_bytes"] == row["file_bytes"] == (tmp_path / "q.onnx").stat().st_size
    assert row["weight_bytes"] < dense["weight_bytes"] / 4 and row["precision"].startswith("mixed")
    assert row["onnx_check"]["images"] == 20 and row["test_images"] == 40 and row["se_points"] > 0
    dense_fp32 = dense["weight_bytes"]
    rows = [{"row": "dense fp32", **dense, "share_of_dense_fp32": 1.0},
            {"row": "bitshrink 2.5%", **row, "share_of_dense_fp32": row["weight_bytes"] / dense_fp32,
             "aim": {"points": 1.0, "drop_points": 3.0, "met": False, "missed_by_points": 2.0}},
            {"row": "bitshrink 1.5%", "error": "SpikepruneError: no"}]
    doc = {"command": "python bench/bytes.py --quick", "date": "d", "machine": {"torch": "t", "cpus": 2},
           "protocol_name": "quick", "protocol": {}, "wall_s": 1.0,
           "models": [{"model": "tiny", "data": "digits", "dense_fp32_weight_bytes": dense_fp32, "test_images": 40,
                       "rows": rows}]}
    md = bench.to_markdown(doc)
    assert "| bitshrink 2.5% | mixed" in md and "missed by 2.00 pt" in md and "SpikepruneError: no" in md
