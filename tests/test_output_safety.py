"""What the command line prints and writes around the results (issue 23): warnings in one line,
errors once across torchrun's processes, progress bars on process 0 only, one file mode for every
saved file. The bad-input rows of the same audit are in tests/bad_input_cases.py."""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys

import pytest

from spikeprune import cli, distributed
from spikeprune.errors import SpikepruneError
from spikeprune.models import create_model
from spikeprune.serialization import save_model

PRESET, TINY = "spikformer-1-32-digits", dict(embed_dim=16, num_heads=2, T=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_model(create_model(PRESET, **TINY), tmp_path_factory.mktemp("tiny") / "model")


def test_a_warning_is_one_line_without_python_source(tiny):
    # a process of its own: pytest records warnings instead of printing them
    done = subprocess.run([sys.executable, "-m", "spikeprune", "evaluate", str(tiny), "--data", "digits",
                           "--max-images", "test=2", "--quiet"],  # 2 images: flagged as too few
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("spikeprune: warning: ") for ln in lines), lines
    assert "rests on 2 images" in lines[0] and ".py:" not in done.stderr


def test_an_error_is_printed_by_process_0_only_and_named_in_torchruns_summary(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(distributed, "_joined", True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    shared = SpikepruneError("the data is bad")
    shared.reported_by_main = True  # as from_main raises it on the other processes
    distributed.report_error("spikeprune: error: the data is bad", shared)
    assert capsys.readouterr().err == ""
    # no error file: an error only this process met is printed, in one line
    distributed.report_error("spikeprune: error: only here", SpikepruneError("only here"))
    assert capsys.readouterr().err == "spikeprune: error: only here\n"
    # under torchrun the line goes to the error file its failure summary reads, and is not printed again
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    distributed.report_error("spikeprune: error: only here", SpikepruneError("only here"))
    assert capsys.readouterr().err == ""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failure = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message["extraInfo"]["py_callstack"] == "spikeprune: error: only here"  # the summary's line
    error_file.unlink()
    monkeypatch.setenv("RANK", "0")
    distributed.report_error("spikeprune: error: the data is bad", shared)
    assert capsys.readouterr().err == "spikeprune: error: the data is bad\n"
    assert error_file.is_file()


def test_progress_bars_of_other_processes_are_silent_even_when_asked_for():
    from tqdm.auto import tqdm

    restore = distributed._silence_progress_bars()
    try:
        assert tqdm(range(2), disable=False).disable
    finally:
        restore()
    assert not tqdm(range(2), disable=False, file=io.StringIO()).disable


def _mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_every_saved_file_has_one_mode(tiny, tmp_path):
    from spikeprune.training import train

    files = [tiny / "config.json", tiny / "model.safetensors"]
    out = tmp_path / "run"
    train(create_model(PRESET, **TINY), "digits", 1, out_dir=out, batch_size=32, max_steps_per_epoch=1,
          progress=False, augment=False)
    files += [p for p in out.rglob("*") if p.is_file()]
    modes = {str(p.relative_to(p.parents[1])): oct(_mode(p)) for p in files}
    assert len(set(modes.values())) == 1, modes
    assert any(p.name == "optimizer.safetensors" for p in files)


def test_under_torchrun_an_error_is_printed_once_and_named_in_the_summary(tiny, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "-m", "spikeprune", "prune", str(tiny), "--data",
                           "digits", "--ratio", "nosuch=0.5", "--quiet", "-o", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    line = "spikeprune: error: 'nosuch' matches no group"
    printed = [ln for ln in done.stderr.splitlines() if ln.startswith(line)]
    assert len(printed) == 1, done.stderr[-3000:]  # once, by process 0, not run together with process 1's
    summary = done.stderr.split("Root Cause")[-1]
    assert f"traceback : {line}" in summary and "To enable traceback" not in done.stderr
