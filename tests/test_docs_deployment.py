"""docs/deployment.md's ONNX Runtime example runs as written (the test split and the export's check
capped) and reaches PyTorch's top-1 from raw pixels."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

DOC = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"


def test_the_onnx_runtime_example_reaches_the_reported_top1(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    example = next(b for b in blocks if "InferenceSession" in b)
    capped = (example.replace('split="test")', 'split="test", max_images=100)')
              .replace('data="mnist5k",', 'data="mnist5k", max_images=16,'))
    assert capped != example and capped.count("max_images=100") == 1 and "max_images=16" in capped
    monkeypatch.chdir(tmp_path)
    exec(compile(capped, str(DOC), "exec"), {})
    out = capsys.readouterr().out
    onnx_top1, torch_top1 = (float(x) for x in re.findall(r"([\d.]+)%", out))
    assert torch_top1 > 90 and abs(onnx_top1 - torch_top1) <= 2.0  # 100 images: ties can flip a class or two
