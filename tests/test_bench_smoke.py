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
