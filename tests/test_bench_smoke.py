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
