"""The shipped models (spikeprune/assets): each loads through bundled_model as what its config says
(family, its preset's architecture and parameter count, the data it was trained on), carries its
training history, and still computes the test top-1 the README states for it, checked on a
stratified subset of its test split within three standard errors of that subset (so the check is
about the weights, not about sampling noise). A new bundled model must state its figure here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spikeprune import data
from spikeprune.bundled import ASSETS, bundled_model, bundled_names
from spikeprune.costs import count_params
from spikeprune.models import create_model, get_family
from spikeprune.stats import top1_standard_error
from spikeprune.training import evaluate

ROOT = Path(__file__).resolve().parent.parent
SUBSET = 1000  # test images checked per model (stratified)
# name: (data spec, test top-1 on the whole test split as the README states it)
CLAIMS = {
    "spikformer-2-128-mnist": ("mnist5k", 0.986),
    "sdt-1-64-mnist": ("mnist5k", 0.972),
    "spikformer-2-128-fmnist": ("fashion-mnist", 0.9046),
    "sdt-2-128-fmnist": ("fashion-mnist", 0.8854),
}


def _fashion_mnist_installed() -> bool:
    return any(data._idx_files(d) is not None for d in data.fashion_mnist_dirs())


def test_every_bundled_model_states_its_figure():
    assert set(bundled_names()) == set(CLAIMS)


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_bundled_model_is_what_its_config_says(name):
    model = bundled_model(name)
    cfg = json.loads((ASSETS / name / "config.json").read_text())
    assert not model.training and get_family(model).name == cfg["family"] == cfg["preset"].split("-")[0]
    assert cfg["preset"] == name  # trained from the preset of the same name, with no override
    assert count_params(model) == count_params(create_model(name))
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
    history = json.loads((ASSETS / name / "history.json").read_text())
    spec, _ = CLAIMS[name]
    assert history["settings"]["data"] == cfg["extra"]["data"] == spec
    assert history["epochs_done"] == len(history["history"]) >= 1


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_bundled_model_reproduces_its_readme_figure(name):
    spec, claim = CLAIMS[name]
    if spec == "fashion-mnist" and not _fashion_mnist_installed():
        pytest.skip("Fashion-MNIST is not installed here (`spikeprune data fashion-mnist` installs it)")
    assert f"{claim:.2%}" in (ROOT / "README.md").read_text()  # the figure this test holds the weights to
    model = bundled_model(name)
    test = data.dataset_for_model(spec, model, split="test", max_images=SUBSET)
    top1 = evaluate(model, test, progress=False)["top1"]
    assert abs(top1 - claim) <= 3 * top1_standard_error(claim, len(test)), (name, top1, claim)
