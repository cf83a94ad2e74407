"""The one validation module (spikeprune.validation) and the objects built on it."""
import math
import warnings

import pytest

import spikeprune as sp
from spikeprune import validation
from spikeprune.errors import SpikepruneError
from spikeprune.run import RunSettings
from spikeprune.validation import FinetuneSettings, check_writable, renamed_arguments


@pytest.mark.parametrize("value", [True, -1, 1.5, "3", None])
def test_whole_refuses_what_is_not_a_whole_number(value):
    with pytest.raises(SpikepruneError, match="--epochs must be a whole number >= 0"):
        validation.whole("--epochs", value, 0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.1, 1.01, True, "x", ""])
def test_number_refuses_non_finite_and_out_of_range(value):
    with pytest.raises(SpikepruneError, match=r"--kd-weight must be a finite number in \[0, 1\]"):
        validation.number("--kd-weight", value, 0, 1)


def test_number_open_ends():
    assert validation.number("lr", 1e-4, 0, low_open=True) == 1e-4
    with pytest.raises(SpikepruneError, match="lr must be a finite number > 0"):
        validation.number("lr", 0.0, 0, low_open=True)


@pytest.mark.parametrize("good", ["cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_accepts_cpu_cuda_and_a_gpu_number(good):
    assert validation.device(good) == good


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "cpu:0", "mps", None, 0])
def test_device_refuses_anything_else(bad):
    with pytest.raises(SpikepruneError, match="--device must be cpu, cuda or cuda:N"):
        validation.device(bad)


def test_parse_max_images():
    assert validation.parse_max_images(["calib=20", "test=30"]) == {"calib": 20, "test": 30}
    assert validation.parse_max_images([]) is None
    for bad in ("calib", "calib=x", "valid=3", "calib=0"):
        with pytest.raises(SpikepruneError, match="--max-images"):
            validation.parse_max_images([bad])


def test_one_precision_list_for_the_package():
    from spikeprune import deploy, policy_api, precision
    # what memory is counted at (constraints, budgets) is one list; what a file's weights are stored
    # at is another, and every one of those is a file-* count of the first
    assert policy_api.PRECISIONS is validation.PRECISIONS
    assert deploy.PRECISIONS == precision.WEIGHT_PRECISIONS
    assert validation.FILE_PRECISIONS == precision.FILE_PRECISIONS


def test_one_check_writable_and_one_check_finite():
    from spikeprune import checkpoint_io, run, serialization, training
    assert serialization.check_writable is run.check_writable is training.check_writable is check_writable
    assert checkpoint_io.check_finite is training.check_finite is validation.check_finite


def test_check_writable_file_or_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    check_writable(tmp_path / "f")  # either
    with pytest.raises(SpikepruneError, match="exists and is not a folder"):
        check_writable(tmp_path / "f", folder=True)
    with pytest.raises(SpikepruneError, match="is a folder; give a file name"):
        check_writable(tmp_path / "d", folder=False)
    with pytest.raises(SpikepruneError, match="is a file, not a folder"):
        check_writable(tmp_path / "f" / "below", "output folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]


# ------------------------------------------------------------------------------------------------
# FinetuneSettings
# ------------------------------------------------------------------------------------------------
def test_finetune_settings_checked_and_frozen():
    f = FinetuneSettings(epochs=2, lr=1e-3, kd=True, kd_weight=0.7, threads=1)
    assert f.train_kwargs() == {"kd_weight": 0.7, "kd_temperature": 4.0, "lr": 1e-3, "batch_size": 64, "threads": 1}
    with pytest.raises(Exception):
        f.epochs = 3  # frozen: one object, read by everyone, changed by no one
    for bad, match in (({"epochs": 0}, "--finetune-epochs"), ({"lr": math.nan}, "--finetune-lr"),
                       ({"kd_weight": 2}, "--kd-weight"), ({"threads": 0}, "--threads")):
        with pytest.raises(SpikepruneError, match=match):
            FinetuneSettings(**bad)


def test_run_settings_hand_fine_tuning_on_as_one_object(tmp_path):
    s = RunSettings(data="mnist5k", output=tmp_path / "r", finetune_epochs=2, kd=True, kd_weight=0.25,
                    finetune_lr=2e-4, finetune_batch_size=16)
    assert s.finetuning == FinetuneSettings(epochs=2, lr=2e-4, batch_size=16, kd=True, kd_weight=0.25)
    # summary.json's "finetune" entry and the fingerprint keep their format (threads only when set)
    assert s.finetune == {"epochs": 2, "kd": True, "kd_weight": 0.25, "kd_temperature": 4.0, "lr": 2e-4,
                          "batch_size": 16}
    assert RunSettings(data="mnist5k", output=tmp_path / "r").finetuning is None
    threaded = RunSettings(data="mnist5k", output=tmp_path / "r", finetune_epochs=1, threads=1)
    assert threaded.finetuning.threads == 1 and threaded.fingerprint_fields()["finetune"]["threads"] == 1
    assert "threads" not in RunSettings(data="mnist5k", output=tmp_path / "r", threads=1).fingerprint_fields()


def test_package_exports_the_registries():
    from spikeprune.importance import register_importance
    from spikeprune.policy_api import register_policy
    assert sp.register_policy is register_policy and sp.register_importance is register_importance
    assert {"register_policy", "register_importance", "FinetuneSettings"} <= set(sp.__all__)


# ------------------------------------------------------------------------------------------------
# Renamed arguments
# ------------------------------------------------------------------------------------------------
def test_renamed_argument_warns_once_and_still_works():
    @renamed_arguments(out_dir="output")
    def f(output=None):
        return output

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert f(out_dir="x") == "x"
        assert f(output="y") == "y"
    assert len(caught) == 1 and issubclass(caught[0].category, FutureWarning)
    assert "f(out_dir=...) is deprecated" in str(caught[0].message) and "use output=" in str(caught[0].message)
    with pytest.raises(SpikepruneError, match="both output= and its old name out_dir="):
        f(out_dir="x", output="y")


# ------------------------------------------------------------------------------------------------
# Accuracy gates count images
# ------------------------------------------------------------------------------------------------
def test_drop_within_compares_counts_of_images():
    assert 100 * (382 / 500 - 377 / 500) > 1.0  # the float comparison refuses an exact 1-point drop
    assert validation.drop_within(382 / 500, 377 / 500, 500, 1.0)
    assert not validation.drop_within(382 / 500, 376 / 500, 500, 1.0)
    assert validation.drop_within(0.5, 0.6, 10, 0)  # a gain is within any limit
    assert validation.drop_within(7 / 10, 6 / 10, 10, 10) and not validation.drop_within(7 / 10, 6 / 10, 10, 9.99)
    assert validation.drop_within(1 / 1000 * 500, 0.499, 1000, 0.1)  # 0.1 is read as 1/10, not its binary value


def test_the_run_gate_counts_images(tiny_model, tmp_path):
    from spikeprune.policy_api import PruneContext
    ctx = PruneContext(tiny_model(), RunSettings(data="digits", output=tmp_path / "r",
                                                 constraints=sp.Constraints(max_acc_drop=1)))
    ctx._dense_top1 = 382 / 500
    ctx._datasets[("calib", False)] = list(range(500))  # 500 calibration images
    assert ctx.within_limit(377 / 500) and not ctx.within_limit(376 / 500)
