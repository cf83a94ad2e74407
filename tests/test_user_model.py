"""A user's own model by reference (`my_model.py:build`, `package.module:build`): built, its checkpoint
read without running pickled code, traced, pruned, saved as safetensors + the pruning record + the
builder reference, and loaded back by calling the builder and replaying the record, bit for bit;
the same from the command line. Bad references and stale builders give one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import spikeprune
from spikeprune.builders import EXAMPLE_NAME, build_user_model, is_builder_ref, load_user_model, resolve_builder
from spikeprune.cli import main as cli_main
from spikeprune.errors import SpikepruneError

# A small spiking-style network of no registered family: conv stem, a residual block, an MLP, a head.
MODEL_SOURCE = '''
import torch
from torch import nn

WIDTH = {width}


class Spike(nn.Module):
    """A stateless threshold neuron (the tracer knows a neuron by its v_threshold)."""

    def __init__(self):
        super().__init__()
        self.v_threshold = 0.0

    def forward(self, x):
        return (x > self.v_threshold).to(x.dtype)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.spike1, self.spike2 = Spike(), Spike()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.proj = nn.Conv2d(8, WIDTH, 3, stride=2, padding=1)
        self.proj_bn = nn.BatchNorm2d(WIDTH)
        self.fc1 = nn.Conv2d(WIDTH, 2 * WIDTH, 1)
        self.fc1_bn = nn.BatchNorm2d(2 * WIDTH)
        self.fc2 = nn.Conv2d(2 * WIDTH, WIDTH, 1)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x):
        x = self.spike1(self.stem_bn(self.stem(x)))
        x = self.proj_bn(self.proj(x))
        x = x + self.fc2(self.spike2(self.fc1_bn(self.fc1(x))))
        return self.head(x.mean((2, 3)))


def build():
    torch.manual_seed(0)
    return Net().eval()


not_a_function = 3


def builds_nothing():
    return "a string"
'''


def write_model(folder, width: int = 16):
    path = folder / "my_model.py"
    path.write_text(MODEL_SOURCE.format(width=width))
    return path


def example(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def run(model, x):
    with torch.no_grad():
        return model(x)


def checkpoint_of(folder, seed: int):
    """A training script's checkpoint: the state dict of DistributedDataParallel ('module.' keys)
    wrapped with other training data, written by torch.save."""
    model = build_user_model(f"{write_model(folder)}:build")
    g = torch.Generator().manual_seed(seed)
    state = {f"module.{k}": (torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 0.5
    path = folder / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path, {k[len("module."):]: v for k, v in state.items()}


@pytest.mark.parametrize("spec, expected", [
    ("my_model.py:build", True), ("path/to/my_model.py:build", True), ("pkg.models:build", True),
    ("models:build", True), ("bundled:sdt-1-64-mnist", False), ("spikformer-1-32-digits", False),
    ("my_model.py", False), ("my_model.py:", False), ("my_model.py:2x", False), ("runs/x", False), (None, False),
])
def test_builder_reference_is_recognised(spec, expected):
    assert is_builder_ref(spec) is expected


def test_bad_builder_references_say_what_is_wrong(tmp_path):
    path = write_model(tmp_path)
    cases = {f"{tmp_path}/missing.py:build": "does not exist", f"{path}:nothing_here": "has no function 'nothing_here'",
             f"{path}:not_a_function": "is a int, not a function", "no_such_package_xyz.models:build": "cannot import",
             "plain words": "not a builder reference"}
    for ref, words in cases.items():
        with pytest.raises(SpikepruneError, match=words):
            resolve_builder(ref)
    with pytest.raises(SpikepruneError, match="returned a str, not a torch.nn.Module"):
        build_user_model(f"{path}:builds_nothing")


def test_module_reference_and_checkpoint_are_loaded(tmp_path, monkeypatch):
    write_model(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt, state = checkpoint_of(tmp_path, seed=1)
    model = build_user_model("my_model:build", checkpoint=ckpt)
    assert model.spikeprune_builder == "my_model:build"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"stem.weight": torch.zeros(1)}}, bad)
    with pytest.raises(SpikepruneError, match="do not match"):
        build_user_model("my_model:build", checkpoint=bad)


def test_pruned_user_model_saves_and_reloads_bit_for_bit_in_a_fresh_process(tmp_path):
    path = write_model(tmp_path)
    ckpt, _ = checkpoint_of(tmp_path, seed=2)
    model = load_user_model(f"{path}:build", example(), checkpoint=ckpt)
    assert model.family == "traced"
    ratios = {g.name: 0.5 for g in spikeprune.groups(model) if g.unit == "channel"}
    assert ratios, "the tracer found no channel group in the test model"
    pruned = spikeprune.prune(model, ratios, "l2")
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    folder = spikeprune.save_model(pruned, tmp_path / "saved")  # the builder it was built from is remembered
    meta = json.loads((folder / "config.json").read_text())
    assert meta["builder"] == f"{path.resolve()}:build" and meta["pruning"]["kept"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", EXAMPLE_NAME, "model.safetensors"]
    spikeprune.save_model(pruned, folder)  # a folder save_model wrote (with its example input) is replaced
    torch.save({"y": run(pruned, example(7)), "state": pruned.state_dict()}, tmp_path / "expected.pt")
    code = textwrap.dedent("""
        import sys, torch, spikeprune
        torch.set_num_threads(1)  # as the suite (conftest.py): float sums in the same order
        m = spikeprune.load_model(sys.argv[1])
        want = torch.load(sys.argv[2])
        x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            assert torch.equal(m(x), want["y"]), "outputs differ"
        s = m.state_dict()
        assert list(s) == list(want["state"]) and all(torch.equal(s[k], want["state"][k]) for k in s), "weights differ"
        assert m.pruning.kept, "no record"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "expected.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_builder_given_at_save_and_load_refuses_a_changed_one(tmp_path):
    path = write_model(tmp_path)
    namespace: dict = {}
    exec(compile(MODEL_SOURCE.format(width=16), "inline", "exec"), namespace)
    inline = namespace["build"]()  # built by the user's own code, not through a reference
    spikeprune.trace(inline, example())
    with pytest.raises(SpikepruneError, match="not a builder reference"):
        spikeprune.save_model(inline, tmp_path / "a", builder="my_model.build")
    assert not (tmp_path / "a").exists()  # nothing half-written
    # without a builder it saves, and loads in this process only (from the trace kept in memory)
    folder = spikeprune.save_model(inline, tmp_path / "a")
    assert "builder" not in json.loads((folder / "config.json").read_text())
    assert torch.equal(run(spikeprune.load_model(folder), example(1)), run(inline, example(1)))
    folder = spikeprune.save_model(inline, tmp_path / "a", builder=f"{path}:build")
    assert json.loads((folder / "config.json").read_text())["builder"] == f"{path.resolve()}:build"
    assert isinstance(spikeprune.load_model(folder), torch.nn.Module)
    # the builder now builds another model: the saved one cannot be rebuilt from it
    model = load_user_model(f"{path}:build", example())
    pruned = spikeprune.prune(model, {g.name: 0.5 for g in spikeprune.groups(model) if g.unit == "channel"}, "l2")
    folder = spikeprune.save_model(pruned, tmp_path / "b")
    wider = tmp_path / "wider"
    wider.mkdir()
    meta = json.loads((folder / "config.json").read_text())
    meta["builder"] = f"{write_model(wider, width=24)}:build"
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(SpikepruneError, match="no longer builds"):
        spikeprune.load_model(folder)


def test_cli_prunes_a_builder_with_its_checkpoint(tmp_path, capsys):
    path = write_model(tmp_path)
    ckpt, _ = checkpoint_of(tmp_path, seed=3)
    code = cli_main(["prune", f"{path}:build", "--checkpoint", str(ckpt), "--data", "digits", "--policy", "uniform",
                     "--uniform", "0.3", "-o", str(tmp_path / "run"), "--max-images", "calib=40",
                     "--max-images", "test=40", "--measure-images", "4", "--latency-repeats", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    loaded = spikeprune.load_model(tmp_path / "run" / "model")
    assert loaded.family == "traced" and loaded.pruning.kept
    with pytest.raises(SystemExit):
        cli_main(["prune", "--help"])
    assert "Reading a Python file or module RUNS ITS CODE" in " ".join(capsys.readouterr().out.split())


def test_cli_inspect_traces_a_builder_on_its_data(tmp_path, capsys):
    path = write_model(tmp_path)
    assert cli_main(["inspect", f"{path}:build"]) != 0  # no --data: nothing to trace it on
    assert "give --data" in capsys.readouterr().err
    assert cli_main(["inspect", f"{path}:build", "--data", "digits", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report and "traced" in json.dumps(report)
    # what the trace refuses is listed with its reason (the head: the model's output)
    assert report["unprunable"] and all(u["module"] and u["reason"] for u in report["unprunable"])
    assert cli_main(["inspect", f"{path}:build", "--data", "digits"]) == 0
    text = capsys.readouterr().out
    assert "layers no group may cut" in text and report["unprunable"][0]["module"] in text
