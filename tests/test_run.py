"""The run layer (spikeprune.run): one settings object checked before any side effect, the same
constraint rules for every policy, the final model written so that a kill never leaves a summary
about a missing model, wall time over killed sessions, failures the report must show, old run
folders refused with the reason."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import spikeprune.run.folder as run_folder
from spikeprune.cli import main
from spikeprune import importance
from spikeprune.errors import SpikepruneError
from spikeprune.hashing import fingerprint
from spikeprune.costs import memory_bytes
from spikeprune.policy_api import (Constraints, PolicyResult, PruneContext, minimum_memory, policies, register_policy,
                                   unregister_policy)
from spikeprune.record import PruningRecord
from spikeprune.run import RUN_VERSION, RunSettings, check_writable, prune_run
from spikeprune.serialization import is_saved_model, load_model, save_model
from spikeprune.surgery import prune

QUICK = dict(batch_size=64, latency_repeats=1, measure_images=16, progress=False)
CLI_QUICK = ["--data", "digits", "--batch-size", "64", "--latency-repeats", "1", "--quiet"]
# What each policy needs to be runnable at all (its own required options).
POLICY_OPTIONS = {"groups": {"ratio": ["block0.mlp.hidden=0.5"]}}


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    path = tmp_path / "model"
    save_model(tiny_model().eval(), path)
    return path


def _tree(path: Path) -> dict:
    """Every file under `path` with its bytes, to prove a failed command changed nothing."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def throwaway_policy():
    names = []

    def register(name, fn):
        register_policy(name)(fn)
        names.append(name)

    yield register
    for n in names:
        unregister_policy(n)


# ------------------------------------------------------------------------------------------------
# One constraints type, the same refusals for every policy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", sorted(policies()))
@pytest.mark.parametrize("limits, words", [
    (dict(target_saving=0.5, memory_budget="20kB"), ["contradict", "Give only one"]),
    (dict(memory_budget="10B"), ["smallest model pruning can reach"]),
    (dict(memory_budget="1MB"), ["not below the dense model"]),
])
def test_contradictory_constraints_are_refused_alike_by_every_policy(tiny_model, tmp_path, policy, limits, words):
    out = tmp_path / "run"
    with pytest.raises(SpikepruneError) as e:
        prune_run(tiny_model(), "digits", out, policy=policy, options=POLICY_OPTIONS.get(policy, {}), **limits, **QUICK)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not out.exists()


def test_context_constraints_are_resolved_against_the_dense_model(tiny_model, tmp_path):
    model = tiny_model()
    ctx = PruneContext(model, RunSettings(data="digits", output=tmp_path, constraints=Constraints(target_saving=0.3,
                                                                                                 precision="int8")))
    c = ctx.constraints
    dense = memory_bytes(model)["int8"]
    assert c.resolved and c.dense_bytes == dense == ctx.dense_memory
    assert c.min_bytes == minimum_memory(model, "int8") and c.budget_bytes == int(dense * 0.7) == ctx.budget_bytes
    assert not tmp_path.joinpath("steps").exists()  # building a context writes nothing


# ------------------------------------------------------------------------------------------------
# Settings: checked when built, hashed for the fingerprint
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field_, value, message", [
    ("workers", -1, "--workers must be a whole number >= 0"),
    ("round_to", 0, "--round-to must be a whole number >= 1"),
    ("finetune_epochs", -1, "--finetune-epochs must be 0 or more"),
    ("kd", True, "--kd distils during fine-tuning"),
    ("ratios", (0.5, 1.0), "outside \\[0, 1\\)"),
    ("importance", "nope", "nope"),
    ("policy", "nope", "unknown policy"),
    ("latency_repeats", 0, "--latency-repeats must be"),
    ("kd_temperature", float("nan"), "--kd-temperature must be a finite number > 0"),
    ("max_images", {"calib": -3}, "positive whole number"),
    ("device", "tpu", "--device must be cpu, cuda or cuda:N"),
])
def test_settings_refuse_bad_values(field_, value, message):
    with pytest.raises(SpikepruneError, match=message):
        RunSettings(data="digits", output="unused", **{field_: value})


def test_workers_below_zero_refused_by_the_cli(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", str(model_dir), *CLI_QUICK, "--workers", "-1", "-o", str(tmp_path / "run")])
    assert e.value.code == 2 and "--workers: must be 0 or more, got -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fingerprint_hashes_the_settings_object():
    base = RunSettings(data="digits", output="a")
    fp = fingerprint(base.fingerprint_fields())
    # Settings that change the result change the fingerprint ...
    for change in (dict(round_to=2), dict(seed=1), dict(constraints=Constraints(max_acc_drop=1)),
                   dict(options={"uniform": 0.2}, policy="uniform"), dict(max_images={"calib": 50}),
                   dict(finetune_epochs=1), dict(ratios=(0.2,))):
        assert fingerprint(dataclasses.replace(base, **change).fingerprint_fields()) != fp, change
    # ... where the output goes and how it is shown do not.
    for change in (dict(output="b"), dict(force=True), dict(progress=False), dict(model_spec="x"), dict(workers=2)):
        assert fingerprint(dataclasses.replace(base, **change).fingerprint_fields()) == fp, change


def test_prune_run_refuses_unknown_settings(tiny_model, tmp_path):
    with pytest.raises(SpikepruneError, match="unknown setting\\(s\\) ratio_grid"):
        prune_run(tiny_model(), "digits", tmp_path / "run", ratio_grid=(0.1,))
    with pytest.raises(SpikepruneError, match="not both"):
        prune_run(tiny_model(), "digits", tmp_path / "run", constraints=Constraints(), max_acc_drop=2)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# Nothing of the user's is touched by a command that fails its checks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    ["--ratio", "block9.mlp.hidden=0.5"],
    ["--ratio", "residual=0.25", "--round-to", "0"],
    ["--ratio", "residual=0.25", "--groups", "nosuch"],
    ["--ratio", "residual=0.25", "--data", "nosuch-dataset"],
    ["--ratio", "residual=0.25", "--target-saving", "0.5", "--memory-budget", "1kB"],
])
def test_force_deletes_nothing_before_every_check_passed(model_dir, tmp_path, capsys, extra):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("the user's")
    before = _tree(out)
    assert main(["prune", str(model_dir), *CLI_QUICK, "-o", str(out), "--force", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spikeprune: error:") and len(err.strip().splitlines()) == 1, err
    assert _tree(out) == before


def test_force_with_a_missing_model_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("the user's")
    assert main(["prune", str(tmp_path / "no-such-model"), *CLI_QUICK, "-o", str(out), "--force", "--uniform", "0.2"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "the user's"


def test_unwritable_output_is_one_line_up_front(model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["prune", str(model_dir), *CLI_QUICK, "--uniform", "0.2", "-o", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is a file" in err
    with pytest.raises(SpikepruneError, match="exists and is not a folder"):
        check_writable(blocker, folder=True)
    # A folder nothing can be created in: chmod 555, or for root (who writes through permission
    # bits) /sys, where no one may create files.
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refusing = [c for c in (ro, Path("/sys/kernel")) if not _can_create_in(c)]
        if not refusing:
            pytest.skip("no folder on this machine refuses writes")
        with pytest.raises(SpikepruneError, match="not writable"):
            check_writable(refusing[0] / "run")
        with pytest.raises(SpikepruneError, match="not writable"):
            check_writable(refusing[0] / "table.csv", folder=False)
        assert main(["prune", str(model_dir), *CLI_QUICK, "--uniform", "0.2", "-o", str(refusing[0] / "run")]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def _can_create_in(folder: Path) -> bool:
    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


# ------------------------------------------------------------------------------------------------
# Run format version
# ------------------------------------------------------------------------------------------------
def test_run_folder_of_the_previous_format_is_refused_with_the_reason(tiny_model, tmp_path):
    out = tmp_path / "run"
    (out / "steps").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"format": "spikeprune-run", "version": 1, "fingerprint": "abc",
                                              "settings": {}}))
    kw = dict(policy="uniform", options={"uniform": 0.2}, **QUICK)
    with pytest.raises(SpikepruneError, match=f"run format 1, this one writes {RUN_VERSION}.*--force"):
        prune_run(tiny_model(), "digits", out, **kw)
    assert json.loads((out / "run.json").read_text())["version"] == 1  # untouched
    s = prune_run(tiny_model(), "digits", out, force=True, **kw)
    assert not s["resumed"] and json.loads((out / "run.json").read_text())["version"] == RUN_VERSION


# ------------------------------------------------------------------------------------------------
# The final model and the summary
# ------------------------------------------------------------------------------------------------
_KILL_AT_MODEL_SWAP = """
import os, sys
import torch
torch.set_num_threads(1)
def killing(real):
    def rename(src, dst, *a, **k):
        dst = os.fspath(dst)
        if os.path.basename(dst) == "model" and os.path.dirname(dst) == sys.argv[1]:
            os._exit(137)  # killed while the final model is renamed into place: no cleanup runs
        return real(src, dst, *a, **k)
    return rename
os.replace, os.rename = killing(os.replace), killing(os.rename)
from spikeprune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_at_the_model_swap_then_resume(model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["prune", str(model_dir), *CLI_QUICK, "--uniform", "0.25", "-o", str(out)]
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_MODEL_SWAP, str(out), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 137, proc.stderr
    left = [p.name for p in out.iterdir() if p.name.startswith(".model.")]
    assert left  # the killed session left its temporary copy ...
    assert not (out / "summary.json").exists() and not is_saved_model(out / "model")  # ... and no false summary

    assert main(args) == 0  # the next session resumes and cleans up
    assert not [p.name for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed"] and load_model(out / "model").pruning.to_dict() == s["pruning"]
    assert sum(p.numel() for p in load_model(out / "model").parameters()) == s["pruned"]["params"]


def test_a_replaced_model_never_sits_under_a_stale_summary(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kw = dict(policy="uniform", options={"uniform": 0.25}, **QUICK)
    prune_run(tiny_model(), "digits", out, **kw)
    save_model(tiny_model(seed=5), out / "model")  # RUN/model no longer holds the run's model
    (out / ".model.old").mkdir()  # and a copy some killed session left behind

    class Killed(BaseException):
        pass

    def die(model, path, *a, **k):
        # At the moment the model is written, no summary may describe what is not there.
        assert not (out / "summary.json").exists() and not (out / "model").exists()
        raise Killed

    monkeypatch.setattr(run_folder, "save_model", die)
    with pytest.raises(Killed):
        prune_run(tiny_model(), "digits", out, **kw)
    monkeypatch.undo()
    s = prune_run(tiny_model(), "digits", out, **kw)
    assert s["resumed"] and not (out / ".model.old").exists()
    assert load_model(out / "model").pruning.to_dict() == s["pruning"]


def test_summary_pruning_record_replays_the_model(tiny_model, tmp_path):
    dense = tiny_model()
    s = prune_run(dense, "digits", tmp_path / "run", policy="uniform", options={"uniform": 0.3}, **QUICK)
    rebuilt = prune(dense, PruningRecord.from_dict(s["pruning"]))
    saved = load_model(tmp_path / "run" / "model")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), saved.state_dict().values()))
    widths = {w["group"]: (w["before"], w["after"]) for w in s["widths"]}
    assert widths["residual"] == (dense.cfg.embed_dim, s["pruning"]["kept_counts"]["residual"])
    # what an embedded target stores (BatchNorm folded, int8 with scales) is reported beside measure's bytes
    from spikeprune.costs import deployed_memory_bytes
    assert s["pruned"]["deployed_bytes"]["int8"] == deployed_memory_bytes(saved)["int8"]
    assert s["pruned"]["deployed_bytes"]["fp32"] < s["pruned"]["memory_bytes"]["fp32"]
    assert "Deployed weights" in (tmp_path / "run" / "report.md").read_text()


def test_kept_dense_model_gets_an_empty_record(tiny_model, tmp_path, throwaway_policy):
    throwaway_policy("test-keep-dense", lambda ctx: PolicyResult(ctx.model, {}))
    model = tiny_model()
    s = prune_run(model, "digits", tmp_path / "run", policy="test-keep-dense", **QUICK)
    assert s["removed"] == {} and s["memory_saved"] == 0 and getattr(model, "pruning", None) is None
    assert load_model(tmp_path / "run" / "model").pruning.kept_counts() == s["pruning"]["dense_sizes"]


# ------------------------------------------------------------------------------------------------
# Wall time, failures the report must show, non-finite numbers
# ------------------------------------------------------------------------------------------------
def test_wall_time_counts_sessions_killed_before_the_end(tiny_model, tmp_path, throwaway_policy, monkeypatch):
    sessions = []

    def slow(ctx):
        sessions.append(1)
        time.sleep(1.0)
        ctx.log("half way")  # every log line may save the wall time
        if len(sessions) == 1:
            raise KeyboardInterrupt  # killed inside the policy, before any step finished
        return PolicyResult(ctx.prune({"block0.mlp.hidden": 0.5}), {})

    throwaway_policy("test-slow", slow)
    monkeypatch.setattr(run_folder, "ELAPSED_EVERY_S", 0.0)
    with pytest.raises(KeyboardInterrupt):
        prune_run(tiny_model(), "digits", tmp_path / "run", policy="test-slow", **QUICK)
    first = json.loads((tmp_path / "run" / "steps" / "elapsed.json").read_text())["seconds"]
    assert first >= 1.0
    s = prune_run(tiny_model(), "digits", tmp_path / "run", policy="test-slow", **QUICK)
    assert s["wall_time_s"] >= first + 1.0  # both sessions
    assert "over several sessions" in (tmp_path / "run" / "report.md").read_text()


def test_failed_plot_and_log_are_said_in_the_report(tiny_model, tmp_path, throwaway_policy, monkeypatch):
    def broken_plot(path):
        raise RuntimeError("no ink")

    def policy(ctx):
        ctx.log_file.unlink()
        ctx.log_file.mkdir()  # from here on the log cannot be opened as a file
        ctx.log("one")
        ctx.log("two")
        return PolicyResult(ctx.prune({"block0.mlp.hidden": 0.5}), {"plots": [("broken.png", broken_plot, "never")]})

    throwaway_policy("test-plot", policy)
    out = tmp_path / "run"
    s = prune_run(tiny_model(), "digits", out, policy="test-plot", **QUICK)
    report = (out / "report.md").read_text()
    assert "this run has no plot broken.png: drawing it failed (RuntimeError: no ink)" in report
    assert sum("this run has no complete log" in w for w in s["warnings"]) == 1  # said once
    assert "this run has no complete log" in report
    assert all(p["file"] != "plots/broken.png" for p in s["plots"])


def test_non_finite_weights_are_refused_before_any_work(tiny_model, tmp_path):
    model = tiny_model()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(SpikepruneError, match="non-finite weights"):
        prune_run(model, "digits", tmp_path / "run", policy="uniform", options={"uniform": 0.2}, **QUICK)
    assert not (tmp_path / "run").exists()


def test_a_nan_during_pruning_is_an_error_not_a_figure(tiny_model, tmp_path, throwaway_policy):
    def poisoned(ctx):
        m = ctx.prune({"block0.mlp.hidden": 0.5})
        with torch.no_grad():
            m.head.weight.fill_(float("nan"))
        return PolicyResult(m, {"calib_top1": ctx.calib_top1(m)})

    throwaway_policy("test-nan", poisoned)
    with pytest.raises(SpikepruneError, match="(?i)nan|finite"):
        prune_run(tiny_model(), "digits", tmp_path / "run", policy="test-nan", **QUICK)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_image_caps_reach_the_policy_and_the_measurements(tiny_model, tmp_path):
    s = prune_run(tiny_model(), "digits", tmp_path / "run", policy="uniform", options={"uniform": 0.2},
                  max_images={"calib": 40, "test": 30}, **QUICK)
    assert s["calib"]["n"] == 40 and s["settings"]["max_images"] == {"calib": 40, "test": 30}


def test_shared_steps_are_reused_by_a_run_of_the_same_model_and_data(tiny_model, tmp_path):
    kw = dict(policy="uniform", uniform_ratios=(0.2, 0.5), **QUICK)
    first = prune_run(tiny_model(), "digits", tmp_path / "a", max_acc_drop=3, **kw)
    assert first["cost"]["policy_calib_passes"] == 3  # dense + two sweep ratios
    again = prune_run(tiny_model(), "digits", tmp_path / "b", max_acc_drop=50, shared_steps=tmp_path / "a", **kw)
    assert again["cost"]["policy_calib_passes"] == 0 and again["uniform_sweep"] == first["uniform_sweep"]
    # every figure of the shared dense measurement, except latency: each run times its models together
    # (interleaved), so a dense timing from another session is never set beside this one's
    def untimed(m):
        return {k: v for k, v in m.items() if not k.startswith("latency")}
    assert untimed(again["dense"]) == untimed(first["dense"]) and not again["resumed"]
    assert set(again["cost"]) == {"policy_wall_s", "policy_calib_passes", "policy_calib_images", "finetune_wall_s",
                                  "measure_wall_s"}
    with pytest.raises(SpikepruneError, match="other settings \\(seed differ\\)"):
        prune_run(tiny_model(), "digits", tmp_path / "c", seed=1, shared_steps=tmp_path / "a", **kw)
    assert not (tmp_path / "c").exists()
    with pytest.raises(SpikepruneError, match="not a run folder"):
        RunSettings(data="digits", output=tmp_path / "d", shared_steps=tmp_path)


def test_a_shared_sensitivity_table_reaches_only_runs_whose_policy_reads_one(tiny_model, tmp_path):
    """The benchmark's shared run holds the table PSViT and PrimeSVT read; a run of a policy that
    never reads one (uniform, shrink, ...) must not carry it, nor report it or its cost."""
    kw = dict(ratios=(0.25, 0.5), uniform_ratios=(0.2,), max_acc_drop=50, **QUICK)
    first = prune_run(tiny_model(), "digits", tmp_path / "a", policy="primesvt", **kw)
    again = prune_run(tiny_model(), "digits", tmp_path / "b", policy="primesvt", shared_steps=tmp_path / "a", **kw)
    assert (tmp_path / "b" / "sensitivity.csv").read_bytes() == (tmp_path / "a" / "sensitivity.csv").read_bytes()
    assert f"reusing sensitivity.csv from {tmp_path / 'a'}" in (tmp_path / "b" / "log.txt").read_text()
    assert again["widths"] == first["widths"] and again["forward_cost"]["sensitivity"] is not None
    other = prune_run(tiny_model(), "digits", tmp_path / "c", policy="uniform", options={"uniform": 0.2},
                      shared_steps=tmp_path / "a", **kw)
    assert not (tmp_path / "c" / "sensitivity.csv").exists()
    assert other["forward_cost"]["sensitivity"] is None
    assert "sensitivity.csv" not in (tmp_path / "c" / "report.md").read_text()


def test_importance_is_a_registered_name_or_object():
    assert RunSettings(data="digits", output="x", importance=importance.get("l1")).importance == "l1"

    class Unregistered(importance.Importance):
        name = "unregistered"

    with pytest.raises(SpikepruneError, match="not registered"):
        RunSettings(data="digits", output="x", importance=Unregistered())
