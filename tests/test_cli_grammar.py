"""One command grammar (issue 23, point 3) and no silent wrong answer from the CLI (point 1).

The grammar is listed once, in spikeprune.cli.GRAMMAR / KIND_FLAGS / DEPRECATED; these tests walk
every sub-command's parser against it."""
import argparse
import json
import tomllib
from pathlib import Path

import pytest

import spikeprune
from spikeprune import cli
from spikeprune.cli import DEPRECATED, GRAMMAR, KIND_FLAGS, grammar_flags, main, subcommand_parsers
from spikeprune.serialization import save_model

ROOT = Path(__file__).resolve().parents[1]
PARSERS = subcommand_parsers()


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _policy_flags() -> set[str]:
    parser = PARSERS["prune"]
    dests = {d for ds in cli._POLICY_ARG_DESTS.values() for d in ds}
    return {s for a in parser._actions if a.dest in dests for s in a.option_strings}


def test_every_subcommand_is_in_the_grammar_and_back():
    assert set(PARSERS) == set(GRAMMAR)


@pytest.mark.parametrize("command", sorted(GRAMMAR))
def test_no_flag_outside_the_grammar(command):
    shared, allowed = grammar_flags(command)
    flags = _flags(PARSERS[command])
    extra = flags - allowed - set(DEPRECATED.get(command, {})) - (_policy_flags() if command == "prune" else set())
    assert not extra, f"spikeprune {command}: {sorted(extra)} are outside the grammar (cli.GRAMMAR)"
    missing = shared - flags
    assert not missing, f"spikeprune {command} lacks the shared flags {sorted(missing)}"


def test_policy_flags_do_not_reuse_a_grammar_word():
    grammar_words = {f for flags in KIND_FLAGS.values() for f in flags} | {f for g in GRAMMAR.values() for f in g.own}
    assert not (_policy_flags() & grammar_words)


def test_the_shared_kinds():
    # every command that runs a model takes --threads and --device; every writer -o/--output and --force
    for command, g in GRAMMAR.items():
        assert "any" in g.kinds
        assert ("runs" in g.kinds) == (command != "models"), command
        if "trained" in g.kinds:
            assert "model" in g.kinds


@pytest.mark.parametrize("command", sorted(GRAMMAR))
def test_help_shows_every_default_and_hides_old_spellings(command):
    parser = PARSERS[command]
    formatter = parser._get_formatter()
    old = set(DEPRECATED.get(command, {}))
    for a in parser._actions:
        if set(a.option_strings) & old:
            assert a.help == argparse.SUPPRESS
            continue
        if a.help == argparse.SUPPRESS or a.nargs == 0 or a.required or isinstance(a, argparse._HelpAction):
            continue
        text = formatter._expand_help(a) if a.help else ""
        assert "default" in text or text.endswith("(required)"), \
            f"spikeprune {command} {a.option_strings or a.dest}: help names no default"
    parser.format_help()  # renders (a '%' in a help text would raise here)


@pytest.mark.parametrize("command, old", [(c, f) for c, olds in sorted(DEPRECATED.items()) for f in olds])
def test_old_spellings_still_parse_with_a_warning(command, old, capsys):
    argv = [command, "bundled"] + (["--epochs", "1"] if command in ("train", "finetune") else [])
    value = "run" if old == "--out" else "3"
    args = cli.build_parser().parse_args(argv + [old, value])
    err = capsys.readouterr().err
    assert f"{old} is deprecated" in err and DEPRECATED[command][old] in err and "0.4" in err
    kept = {a.dest for a in PARSERS[command]._actions if old in a.option_strings}.pop()
    assert str(getattr(args, kept)) == value


def test_device_takes_cpu_cuda_and_a_gpu_number():
    parser = cli.build_parser()
    assert parser.parse_args(["evaluate", "--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--device", "gpu"])


def test_version_has_one_source(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"spikeprune {spikeprune.__version__}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "spikeprune.__version__"}
    assert isinstance(project["project"]["license"], str)  # an SPDX expression, not the deprecated table


# ------------------------------------------------------------------------------------------------
# Python: the same words
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn, renames", [
    (spikeprune.train, {"out_dir": "output", "overwrite": "force"}),
    (spikeprune.finetune, {"out_dir": "output", "overwrite": "force"}),
    (spikeprune.export, {"path": "output", "overwrite": "force", "check_images": "max_images", "verbose": "progress"}),
    (spikeprune.measure, {"n_images": "max_images"}),
    (spikeprune.prune_run, {"out": "output"}),
])
def test_python_arguments_use_the_cli_words(fn, renames):
    assert fn.renamed_arguments == renames


def test_python_old_names_work_with_a_future_warning(tiny_model, tmp_path):
    from spikeprune.sensitivity import analyze
    model = tiny_model().eval()
    with pytest.warns(FutureWarning, match=r"measure\(n_images=...\) is deprecated .* use max_images="):
        old = spikeprune.measure(model, data="digits", n_images=8, latency=False)
    new = spikeprune.measure(model, data="digits", max_images=8, latency=False)
    assert old["total"]["sops"] == new["total"]["sops"]
    with pytest.warns(FutureWarning, match="out_csv"):
        analyze(model, "digits", groups="block0.mlp.hidden", ratios=[0.5], out_csv=tmp_path / "t.csv", progress=False)
    assert (tmp_path / "t.csv").is_file()


def test_evaluate_takes_max_images(tiny_model):
    m = spikeprune.evaluate(tiny_model(), "digits", split="calib", max_images=40, progress=False)
    assert m["n"] == 40


# ------------------------------------------------------------------------------------------------
# No silent wrong answer
# ------------------------------------------------------------------------------------------------
def test_models_says_which_presets_have_weights(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["spikformer-2-128-mnist"]["weights"] == "bundled:spikformer-2-128-mnist"
    assert rows["spikformer-1-32-digits"]["weights"] == "random"
    assert main(["models"]) == 0
    assert "random weights" in capsys.readouterr().out


def test_a_preset_without_weights_is_refused_where_a_trained_model_is_implied(capsys):
    tiny = ["--set", "embed_dim=16", "--set", "num_heads=2", "--set", "T=2", "--data", "digits"]
    assert main(["evaluate", "spikformer-2-128-mnist"]) == 2
    err = capsys.readouterr().err
    assert "random weights" in err and "bundled:spikformer-2-128-mnist" in err and "--random-weights" in err
    assert main(["evaluate", "spikformer-1-32-digits", *tiny, "--random-weights", "--max-images", "test=20",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["weights"] == "random" and "random weights" in captured.err
    # inspect shows structure: a preset is fine there, with the same note
    assert main(["inspect", "spikformer-1-32-digits"]) == 0 and "random weights" in capsys.readouterr().err


def test_a_model_is_evaluated_on_the_data_set_it_records(tiny_model, tmp_path, capsys):
    folder = tmp_path / "m"
    save_model(tiny_model().eval(), folder, extra={"data": "digits"})
    assert main(["evaluate", str(folder), "--max-images", "test=30", "--json"]) == 0  # no --data
    captured = capsys.readouterr()
    assert json.loads(captured.out)["data"] == "digits" and "the data set the model records" in captured.err
    # another data set of another image size is an error, not a resized, meaningless figure
    assert main(["evaluate", str(folder), "--data", "mnist5k"]) == 2
    assert "28x28 images but the model takes 16x16" in capsys.readouterr().err


def test_unmet_constraints_exit_3_and_keep_the_run_folder(trained_tiny_path, tmp_path, capsys):
    out = tmp_path / "run"  # the trained tiny model (~80% calib) loses far more than 0 points at 90%
    rc = main(["prune", str(trained_tiny_path), "--data", "digits", "--uniform", "0.9", "--max-acc-drop", "0", "--quiet",
               "--latency-repeats", "1", "--max-images", "calib=60", "--max-images", "test=60",
               "--max-images", "firing=8", "-o", str(out), "--json"])
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert not doc["constraints_met"] and doc["acc_drop_calib_points"] > 0
    assert rc == cli.EXIT_CONSTRAINTS_NOT_MET == doc["exit_code"] == 3
    assert "constraints NOT met" in captured.err and (out / "summary.json").is_file() and (out / "model").is_dir()
    assert json.loads((out / "summary.json").read_text())["settings"]["measure_images"] == 8


def test_threads_hold_for_the_whole_command_and_are_restored(monkeypatch, capsys):
    import torch
    seen = []
    real = cli.inspect_model
    monkeypatch.setattr(cli, "inspect_model", lambda model: seen.append(torch.get_num_threads()) or real(model))
    before = torch.get_num_threads()
    assert main(["inspect", "spikformer-1-32-digits", "--threads", "1", "--quiet", "--json"]) == 0
    assert seen == [1] and torch.get_num_threads() == before


def test_train_json_in_percent_with_image_caps(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "spikformer-1-32-digits", "--set", "embed_dim=16", "--set", "num_heads=2", "--set", "T=2",
                 "--data", "digits", "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "16", "--max-images", "train=64",
                 "--max-images", "calib=40", "--max-images", "test=30", "--quiet", "--json", "-o", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["data"] == "digits"
    assert doc["test_images"] == 30 and 0 <= doc["test_top1_pct"] <= 100 and doc["output"] == str(out)
    # the trained folder records its data set: evaluate needs no --data
    assert cli.recorded_data(str(out)) == doc["data"]
