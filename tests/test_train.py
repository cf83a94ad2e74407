"""Training, evaluation and fine-tuning on a tiny model and the bundled digits: metrics, learning,
determinism, resume, NaN handling, distillation, atomic outputs and the CLI."""
import contextlib
import copy
import importlib
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spikeprune.cli import _print_best, main
from spikeprune.data import load_dataset, make_loader
from spikeprune.errors import SpikepruneError
from spikeprune.serialization import load_model, save_model
from spikeprune.training import TrainSettings, evaluate, finetune, kd_loss, lr_at, train

train_mod = importlib.import_module("spikeprune.training")  # the package binds the function `train`

FAST = dict(progress=False, max_steps_per_epoch=4, batch_size=32, lr=3e-3)


def fit(model, data, epochs, **kwargs):
    """train() with the recipe keywords of a call gathered into its TrainSettings."""
    recipe, how = TrainSettings.split(epochs, **kwargs)
    return train(model, data, recipe, **how)


def test_the_old_recipe_keywords_still_train_the_same_with_a_warning(tiny_model):
    new, h_new = train(tiny_model(), "digits", TrainSettings(1, seed=3, max_steps_per_epoch=3, batch_size=32, lr=3e-3),
                       progress=False)
    with pytest.warns(FutureWarning, match=r"train\(seed=, max_steps_per_epoch=, batch_size=, lr=...\) is deprecated"):
        old, h_old = train(tiny_model(), "digits", 1, seed=3, max_steps_per_epoch=3, batch_size=32, lr=3e-3,
                           progress=False)
    assert _same_weights(new, old) and h_new[0]["train_loss"] == h_old[0]["train_loss"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        train(tiny_model(), "digits", 1, learning_rate=1.0)
    with pytest.raises(SpikepruneError, match="takes a TrainSettings"):
        train(tiny_model(), "digits", "3")
    with pytest.raises(SpikepruneError, match="label_smoothing must be"):
        TrainSettings(1, label_smoothing=1.0)


def _leftovers(folder: Path) -> list[str]:
    """Temporary or half-written entries (every temp name starts with a dot)."""
    return [str(p) for p in folder.rglob(".*")]


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def teacher():
    """A tiny model trained for a few epochs on digits (well above chance)."""
    torch.manual_seed(0)
    from spikeprune.models import create_model

    model = create_model("spikformer-1-32-digits", embed_dim=32, num_heads=2, T=2)
    fit(model, "digits", 2, progress=False, lr=5e-3, batch_size=32, warmup_epochs=0.5)
    return model


# ------------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------------
def test_evaluate_keys_ranges_and_inputs(tiny_model):
    model = tiny_model()
    model.train()
    m = evaluate(model, "digits", split="calib", progress=False)
    assert set(m) == {"top1", "top5", "loss", "n"} and m["n"] == len(load_dataset("digits", "calib"))
    assert 0 <= m["top1"] <= m["top5"] <= 1 and m["loss"] > 0
    assert model.training  # mode restored
    ds = load_dataset("digits", "calib")
    for other in (evaluate(model, ds, batch_size=64, progress=False),
                  evaluate(model, make_loader(ds, 50), progress=False)):
        assert other["top1"] == m["top1"] and other["top5"] == m["top5"] and other["n"] == m["n"]
        assert other["loss"] == pytest.approx(m["loss"], rel=1e-5)  # summed in another order
    assert evaluate(model, ds, batch_size=64, max_batches=1, progress=False)["n"] == 64


def test_evaluate_top5_is_top_k_for_few_classes(tiny_model):
    model = tiny_model(num_classes=3)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(12, 1, 16, 16, generator=g), torch.arange(12) % 3)
    m = evaluate(model, data, progress=False)
    assert m["top5"] == 1.0 and m["n"] == 12  # k = 3 classes: always a hit
    with pytest.raises(SpikepruneError, match="dataset spec"):
        evaluate(model, 42, progress=False)


# ------------------------------------------------------------------------------------------------
# losses and schedule
# ------------------------------------------------------------------------------------------------
def test_kd_loss_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    T = 3.0
    manual = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean()
    assert torch.allclose(kd_loss(s, t, y, 1.0, T), T * T * manual, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, y, 0.0, T), F.cross_entropy(s, y))
    assert kd_loss(s, s, y, 1.0, T).abs() < 1e-6


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(i, 100, 10, 1.0) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(train_mod.MIN_LR_FACTOR)


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------
def test_training_reduces_loss(teacher):
    fresh = load_model_like(teacher, seed=0)
    before = evaluate(fresh, "digits", split="calib", progress=False)
    after = evaluate(teacher, "digits", split="calib", progress=False)
    assert after["loss"] < before["loss"] - 0.3
    assert after["top1"] > before["top1"] + 0.2


def load_model_like(model, seed):
    from spikeprune.models import build_from_config

    torch.manual_seed(seed)
    return build_from_config(model.config_dict())


def test_same_seed_same_weights(tiny_model, tmp_path):
    a, ha = fit(tiny_model(), "digits", 1, seed=5, **FAST)
    b, hb = fit(tiny_model(), "digits", 1, seed=5, **FAST)
    c, _ = fit(tiny_model(), "digits", 1, seed=6, **FAST)
    assert _same_weights(a, b) and ha[0]["train_loss"] == hb[0]["train_loss"]
    assert not _same_weights(a, c)


def test_outputs_layout_and_refusal_to_overwrite(tiny_model, tmp_path):
    out = tmp_path / "run"
    model, history = fit(tiny_model(), "digits", 2, output=out, **FAST)
    assert _same_weights(load_model(out), model)  # OUT itself is a saved model folder
    assert (out / "checkpoint" / "train_state.json").is_file()
    assert (out / "checkpoint" / "optimizer.safetensors").is_file()
    state = json.loads((out / "checkpoint" / "train_state.json").read_text())
    doc = json.loads((out / "history.json").read_text())
    assert state["epoch"] == 2 and len(doc["history"]) == 2 and doc["settings"]["lr"] == FAST["lr"]
    assert _leftovers(out) == []
    with pytest.raises(SpikepruneError, match="already holds a training run"):
        fit(tiny_model(), "digits", 2, output=out, **FAST)
    # --resume on a finished run trains nothing more and returns its model and history.
    again, h2 = fit(tiny_model(seed=9), "digits", 2, output=out, resume=True, **FAST)
    assert _same_weights(again, model) and [r["train_loss"] for r in h2] == [r["train_loss"] for r in history]


def test_resume_reaches_the_uninterrupted_weights(tiny_model, tmp_path, monkeypatch):
    straight, _ = fit(tiny_model(), "digits", 2, output=tmp_path / "a", **FAST)

    real_write = train_mod._write_checkpoint

    def write_then_die(out, model, opt, scaler, state, doc):
        real_write(out, model, opt, scaler, state, doc)
        if state["epoch"] == 1:
            raise KeyboardInterrupt  # killed right after epoch 1's checkpoint

    monkeypatch.setattr(train_mod, "_write_checkpoint", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), "digits", 2, output=tmp_path / "b", **FAST)
    monkeypatch.setattr(train_mod, "_write_checkpoint", real_write)
    assert json.loads((tmp_path / "b" / "checkpoint" / "train_state.json").read_text())["epoch"] == 1
    resumed, history = fit(tiny_model(seed=123), "digits", 2, output=tmp_path / "b", resume=True, **FAST)
    assert len(history) == 2
    assert _same_weights(resumed, straight)
    assert _same_weights(load_model(tmp_path / "b"), straight)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model, tmp_path):
    model = tiny_model()
    calls = {"n": 0}

    def poison(module, inputs, output):  # NaN logits from the 2nd epoch's first training step on
        if module.training:
            calls["n"] += 1
            if calls["n"] > FAST["max_steps_per_epoch"]:
                return output * float("nan")
        return output

    model.register_forward_hook(poison)
    out = tmp_path / "run"
    with pytest.raises(SpikepruneError, match=r"loss became nan at epoch 2.*epoch 1\).*lower --lr"):
        fit(model, "digits", 3, output=out, **FAST)
    saved = load_model(out)
    state = json.loads((out / "checkpoint" / "train_state.json").read_text())
    assert state["epoch"] == 1 and _same_weights(saved, load_model(out / "checkpoint" / "model"))
    assert _same_weights(saved, model)  # the in-memory model is back to the good weights
    assert _leftovers(out) == []


def test_nan_in_first_epoch_leaves_no_folder(tiny_model, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SpikepruneError, match="nothing was saved"):
        fit(tiny_model(), "digits", 2, output=out, **{**FAST, "lr": 1e30})
    assert not out.exists()


def test_bad_training_arguments(tiny_model, tmp_path):
    with pytest.raises(SpikepruneError, match="epochs"):
        fit(tiny_model(), "digits", 0, progress=False)
    with pytest.raises(SpikepruneError, match="lr must be a finite number > 0"):
        fit(tiny_model(), "digits", 1, lr=-1, progress=False)
    with pytest.raises(SpikepruneError, match="resume needs"):
        fit(tiny_model(), "digits", 1, resume=True, progress=False)
    with pytest.raises(SpikepruneError, match="num_classes"):
        fit(tiny_model(num_classes=5), "digits", 1, progress=False)
    out = tmp_path / "run"
    fit(tiny_model(), "digits", 2, output=out, **FAST)
    with pytest.raises(SpikepruneError, match="different architecture"):
        fit(tiny_model(embed_dim=32), "digits", 3, output=out, resume=True, **FAST)
    # A damaged checkpoint is reported, not half-used.
    opt_file = out / "checkpoint" / "optimizer.safetensors"
    opt_file.write_bytes(opt_file.read_bytes()[:100])
    with pytest.raises(SpikepruneError, match="corrupt or truncated"):
        fit(tiny_model(), "digits", 3, output=out, resume=True, **FAST)
    (out / "checkpoint" / "train_state.json").write_text('{"epoch": 1,')
    with pytest.raises(SpikepruneError, match="damaged"):
        fit(tiny_model(), "digits", 3, output=out, resume=True, **FAST)


def test_finetune_with_distillation_lowers_the_loss(teacher, tiny_model):
    student = tiny_model(embed_dim=32)
    images, _ = load_dataset("digits", "calib").batch(list(range(0, 180, 2)))

    def kl_to_teacher():
        with torch.no_grad():
            student.eval(), teacher.eval()
            return F.kl_div(F.log_softmax(student(images), 1), F.log_softmax(teacher(images), 1),
                            reduction="batchmean", log_target=True).item()

    kl_before = kl_to_teacher()
    _, history = finetune(student, "digits", 3, teacher=teacher, kd_weight=0.7, kd_temperature=2.0, lr=5e-3,
                          progress=False, batch_size=32, max_steps_per_epoch=10)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert kl_to_teacher() < kl_before  # the student moved towards the teacher


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
TINY_SET = ["--set", "embed_dim=16", "--set", "num_heads=2", "--set", "T=2"]


def test_cli_train_evaluate_finetune(tmp_path, capsys, teacher):
    out = tmp_path / "run"
    rc = main(["train", "spikformer-1-32-digits", *TINY_SET, "--data", "digits", "--epochs", "1",
               "--max-steps-per-epoch", "3", "--batch-size", "32", "-o", str(out), "--quiet"])
    assert rc == 0 and "test top-1" in capsys.readouterr().out
    assert load_model(out).cfg.embed_dim == 16

    assert main(["evaluate", str(out), "--data", "digits", "--split", "calib", "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert m["split"] == "calib" and m["images"] == 180 and 0 <= m["top1_pct"] <= m["top5_pct"] <= 100  # percent

    assert main(["evaluate", str(out), "--data", "digits"]) == 0
    captured = capsys.readouterr()
    assert "top-1" in captured.out and "top-5" in captured.out

    teacher_dir = tmp_path / "teacher"
    save_model(teacher, teacher_dir)
    rc = main(["finetune", str(out), "--teacher", str(teacher_dir), "--data", "digits", "--epochs", "1",
               "--max-steps-per-epoch", "3", "-o", str(tmp_path / "ft"), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "before" in text and "after" in text and "distillation" in text
    assert _leftovers(tmp_path) == []


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["evaluate", "spikformer-1-32-digits", "--random-weights", "--quiet", "--data", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spikeprune: error: unknown dataset") and "\n" not in err
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"format": "spikeprune-model"}')
    rc = main(["train", "spikformer-1-32-digits", *TINY_SET, "--data", "digits", "--epochs", "1", "-o", str(out)])
    assert rc == 2 and "--force" in capsys.readouterr().err
    (out / "config.json").write_text("{}")  # not ours: left alone even with --force
    rc = main(["train", "spikformer-1-32-digits", *TINY_SET, "--data", "digits", "--epochs", "1", "-o", str(out),
               "--force"])
    assert rc == 2 and "did not write" in capsys.readouterr().err and (out / "config.json").read_text() == "{}"


def test_thread_count_is_set_for_training_restored_and_recorded(tiny_model, tmp_path):
    # The CPU kernels split float32 sums by thread count: the count is part of what makes a run repeatable.
    before = torch.get_num_threads()
    seen = []
    model = tiny_model()
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    fit(model, "digits", 1, threads=2, output=tmp_path / "run", **FAST)
    assert seen and set(seen) == {2}  # training steps and the calib evaluation
    assert torch.get_num_threads() == before
    assert json.loads((tmp_path / "run" / "history.json").read_text())["settings"]["torch_threads"] == 2
    with pytest.raises(SpikepruneError, match="threads must be a whole number >= 1"):
        fit(tiny_model(), "digits", 1, threads=0, **FAST)


def test_best_calibration_epoch_is_kept_in_out_best(tiny_model, tmp_path, monkeypatch):
    """OUT/best holds the model of the epoch with the best calibration top-1 (here the second of
    three), so a user can choose on the calibration split when the last epoch is not the best; the
    CLI names it."""
    import spikeprune.training as training

    scripted, snapshots = iter([0.5, 0.7, 0.6]), []

    def fake_evaluate(model, data, **kw):
        snapshots.append(copy.deepcopy(model).eval())
        return {"top1": next(scripted), "top5": 1.0, "loss": 1.0, "n": 10}

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    out = tmp_path / "run"
    model, history = fit(tiny_model(), "digits", 3, output=out, **FAST)
    best = load_model(out / "best")
    assert _same_weights(best, snapshots[1]) and not _same_weights(best, model)
    assert json.loads((out / "best" / "config.json").read_text())["extra"]["epochs_trained"] == 2
    assert json.loads((out / "history.json").read_text())["best"] == {"epoch": 2, "calib_top1": 0.7}
    assert _leftovers(out) == []

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _print_best(out, history)
    assert "epoch 2 had the best calibration top-1 (70.00% against 60.00% last)" in buf.getvalue()
    assert str(out / "best") in buf.getvalue()
