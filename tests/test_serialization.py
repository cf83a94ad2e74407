"""Saving without losing anything (issue 10): save_model refuses what it would destroy, a save killed
at any point leaves nothing behind for good (the next save cleans or restores), unwritable places
are one-line errors, NaN/Inf weights are refused on load, and damaged or unsafe files say what they
are. The crash points are real kills: a child process saves with os._exit(9) at that moment."""
from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from spikeprune.errors import SpikepruneError
from spikeprune.models import create_model
from spikeprune.serialization import (atomic_path, check_finite, check_writable, clean_interrupted_write, is_saved_model,
                                      load_model, read_checkpoint, save_model, write_json)

from bad_input_cases import PRESET, TINY, _readonly_folder


def _model(seed: int):
    torch.manual_seed(seed)
    return create_model(PRESET, **TINY).eval()


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _siblings(path: Path) -> list[str]:
    """Our hidden leftovers next to `path`: .NAME.old and .NAME.*.tmp."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# ------------------------------------------------------------------------------------------------
# What save_model may replace
# ------------------------------------------------------------------------------------------------
def test_save_replaces_a_model_folder_and_fills_an_empty_one(tmp_path):
    target = save_model(_model(0), tmp_path / "m")
    save_model(_model(1), target)
    assert _same(load_model(target), _model(1)) and _siblings(target) == []
    (tmp_path / "empty").mkdir()
    save_model(_model(2), tmp_path / "empty")
    assert is_saved_model(tmp_path / "empty")


@pytest.mark.parametrize("files", [
    {"notes.txt": "mine"},                                                        # a user's folder
    {"config.json": '{"model_type": "bert"}', "model.safetensors": "x"},          # another tool's model
    {"config.json": json.dumps({"format": "spikeprune-model"}), "history.json": "{}"},  # a training output
    {"model.safetensors": "weights without a config"},
])
def test_save_refuses_a_folder_it_did_not_write(tmp_path, files):
    target = tmp_path / "mine"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    with pytest.raises(SpikepruneError, match="not a spikeprune model folder"):
        save_model(_model(0), target)
    assert {p.name: p.read_text() for p in target.iterdir()} == files
    assert _siblings(target) == []


def test_save_refuses_a_file(tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("a user's file")
    with pytest.raises(SpikepruneError, match="is a file"):
        save_model(_model(0), f)
    assert f.read_text() == "a user's file" and _siblings(f) == []


def test_file_and_folder_never_replace_each_other(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    with pytest.raises(SpikepruneError, match="is a folder"):
        write_json(folder, {"a": 1})
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(SpikepruneError, match="is a file"):
        with atomic_path(f, is_dir=True):
            pass
    assert f.read_text() == "x" and folder.is_dir()


# ------------------------------------------------------------------------------------------------
# A save killed midway: real kills at each moment, then the next save
# ------------------------------------------------------------------------------------------------
_DIE = textwrap.dedent("""
    import os, sys, shutil, torch
    import spikeprune.serialization as s
    from spikeprune.models import create_model
    target, point = sys.argv[1], sys.argv[2]
    torch.manual_seed(1)
    model = create_model({preset!r}, **{tiny!r}).eval()
    real_replace, real_rmtree, real_save = os.replace, shutil.rmtree, s.save_file
    replaces = []

    def replace(a, b):
        replaces.append(a)
        if point == "between-renames" and len(replaces) == 2:
            os._exit(9)  # the old folder is aside, the new one not yet in place
        return real_replace(a, b)

    def rmtree(p, *a, **k):
        if point == "during-cleanup":
            victims = sorted(x for x in os.listdir(p))
            os.unlink(os.path.join(p, victims[0]))
            os._exit(9)  # the old copy half deleted
        return real_rmtree(p, *a, **k)

    def save_file(tensors, filename, metadata=None):
        if point == "while-writing":
            open(filename, "wb").write(b"half a file")
            os._exit(9)
        return real_save(tensors, filename, metadata=metadata)

    s.os.replace, s.shutil.rmtree, s.save_file = replace, rmtree, save_file
    s.save_model(model, target)
""").format(preset=PRESET, tiny=TINY)


def _killed_save(target: Path, point: str) -> None:
    r = subprocess.run([sys.executable, "-c", _DIE, str(target), point], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr


@pytest.mark.parametrize("point", ["while-writing", "between-renames", "during-cleanup"])
def test_a_killed_save_leaves_nothing_for_good(tmp_path, point):
    target = save_model(_model(0), tmp_path / "m")
    _killed_save(target, point)
    left = _siblings(target)
    assert left, "the kill should have left something to clean"  # else the simulation missed its moment
    if point == "while-writing":
        assert _same(load_model(target), _model(0))  # the previous model is untouched
    save_model(_model(2), target)
    assert _same(load_model(target), _model(2))
    assert _siblings(target) == []


def test_between_the_renames_the_last_complete_model_comes_back(tmp_path):
    target = save_model(_model(0), tmp_path / "m")
    _killed_save(target, "between-renames")
    assert not target.exists() and f".{target.name}.old" in _siblings(target)
    clean_interrupted_write(target)  # what any later save (or training's resume) does first
    assert _same(load_model(target), _model(0)) and _siblings(target) == []


def test_temporaries_of_a_live_writer_are_left_alone(tmp_path):
    target = tmp_path / "m"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        live_tmp = tmp_path / f".m.{sleeper.pid}-abc.tmp"
        dead_tmp = tmp_path / f".m.{int(dead.stdout)}-abc.tmp"
        old_style = tmp_path / ".m.k2j_x8.tmp"  # written by an earlier version: no pid
        for p in (live_tmp, dead_tmp, old_style):
            p.mkdir()
        clean_interrupted_write(target)
        assert live_tmp.exists() and not dead_tmp.exists() and not old_style.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------------------------
# Unwritable places
# ------------------------------------------------------------------------------------------------
def test_check_writable_passes_new_and_existing_paths_and_leaves_nothing(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "out")
    (tmp_path / "there").mkdir()
    check_writable(tmp_path / "there")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["there"]


def test_check_writable_refuses_a_path_below_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpikepruneError, match="is a file, not a folder"):
        check_writable(tmp_path / "f" / "out", "output folder")


def test_read_only_places_are_one_line_errors(tmp_path):
    ro = _readonly_folder(tmp_path / "ro")
    if ro is None:
        pytest.skip("no folder on this machine refuses writes")
    with pytest.raises(SpikepruneError, match="not writable") as e:
        check_writable(ro / "out", "output folder")
    assert "\n" not in str(e.value)
    with pytest.raises(SpikepruneError, match="cannot write"):
        save_model(_model(0), ro / "m")
    with pytest.raises(SpikepruneError, match="cannot write"):
        write_json(ro / "x.json", {})


def test_a_full_disk_while_writing_is_one_line_and_leaves_no_temporary(tmp_path):
    with pytest.raises(SpikepruneError, match="no space left"):
        with atomic_path(tmp_path / "big.bin") as tmp:
            tmp.write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Loading: broken weights, damaged folders, unsafe files
# ------------------------------------------------------------------------------------------------
def test_non_finite_weights_are_refused_naming_the_first_bad_tensor(tmp_path):
    model = _model(0)
    name = next(k for k, v in model.state_dict().items() if v.is_floating_point())
    with torch.no_grad():
        model.state_dict()[name].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    path = save_model(model, tmp_path / "m")  # saving a broken model is allowed: it may be evidence
    with pytest.raises(SpikepruneError, match=rf"{name} holds 1 NaN and 1 Inf of \d+ values"):
        load_model(path)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    with pytest.raises(SpikepruneError, match=rf"checkpoint .*m.pth has non-finite weights: {name}"):
        create_model(PRESET, checkpoint_path=tmp_path / "m.pth", **TINY)
    check_finite(_model(0), "a fine model")  # finite weights pass


def test_load_model_of_a_checkpoint_file_says_what_to_do(tmp_path):
    torch.save(_model(0).state_dict(), tmp_path / "w.pth")
    with pytest.raises(SpikepruneError, match=r"checkpoint file, not a saved model folder: load it with "
                                              r"spikeprune.create_model\(PRESET, checkpoint_path="):
        load_model(tmp_path / "w.pth")
    with pytest.raises(SpikepruneError, match="does not exist"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("config, words", [
    ({"format": "spikeprune-model", "family": "spikformer"}, "no 'config' object"),
    ({"format": "spikeprune-model", "family": "spikformer", "config": [1]}, "no 'config' object"),
    (["not", "a", "dict"], "not a spikeprune model config"),
])
def test_damaged_config_json_is_named(tmp_path, config, words):
    path = save_model(_model(0), tmp_path / "m")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpikepruneError, match=words):
        load_model(path)


class _RunsCode:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "torch.save legacy", "pickle protocol 2", "pickle protocol 5",
                                 "pickle protocol 0"])
def test_pickles_that_would_run_code_are_refused_as_such(tmp_path, how):
    import pickle

    _RunsCode.marker = str(tmp_path / "code-ran")
    path = tmp_path / "evil.pth"
    if how.startswith("torch.save"):
        torch.save({"w": torch.zeros(2), "x": _RunsCode()}, path, _use_new_zipfile_serialization="legacy" not in how)
    else:
        path.write_bytes(pickle.dumps(_RunsCode(), protocol=int(how.split()[-1])))
    with pytest.raises(SpikepruneError, match=r"refused: this file would run code when unpickled \(it calls "
                                              r"(builtins|io)\.open\)"):
        read_checkpoint(path)
    assert not (tmp_path / "code-ran").exists()


def test_a_plain_pickle_and_an_empty_folder_are_named_for_what_they_are(tmp_path):
    import pickle

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    with pytest.raises(SpikepruneError, match="plain Python pickle, not a torch checkpoint"):
        read_checkpoint(tmp_path / "plain.pkl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpikepruneError, match="is an empty folder, not a checkpoint file") as e:
        read_checkpoint(tmp_path / "empty")
    assert "corrupt" not in str(e.value)
