"""report.md and the plots read right (issue 23, point 5): every accuracy with its image count and
standard error, one number format per column, the cost section's passes adding up, no "1 epochs";
plots whose labels neither overprint nor leave the figure, shares from zero, the limit in every
legend, the sensitivity plot one panel per group kind."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from spikeprune.models import create_model
from spikeprune.plots import label_points, new_figure, pyplot
from spikeprune.report import group_kind, plot_sensitivity, plot_tradeoff, plot_uniform_sweep, with_error
from spikeprune.run import prune_run

TINY = dict(embed_dim=16, num_heads=2, T=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    summary = prune_run(create_model("spikformer-1-32-digits", **TINY), "digits", out, policy="uniform",
                        uniform_ratios=(0.25,), max_acc_drop=100.0, finetune_epochs=1, batch_size=64,
                        max_images={"train": 64, "calib": 50, "test": 40}, measure_images=8, latency_repeats=1,
                        progress=False)
    return out, summary, (out / "report.md").read_text()


def test_every_accuracy_states_its_images_and_standard_error(run):
    out, s, md = run
    assert s["test_images"] == 40 and s["dense"]["images"] == 40
    results = md.split("## Results (test split)")[1].split("##")[0]
    rows = [ln for ln in results.splitlines() if ln.startswith(("| dense", "| pruned", "| finetuned"))]
    assert len(rows) == 3
    for row in rows:
        top1, top5 = row.split("|")[2:4]
        assert re.fullmatch(r" \d+\.\d\d% ± \d+\.\d\d ", top1) and "±" in top5, row
    assert "on 40 test images" in results and "standard error" in results
    assert re.search(r"Calibration split \(50 images.*dense \d+\.\d\d% ± \d+\.\d\d", results)
    outcome = md.split("## Constraints")[0]
    assert "(50 images; limit 100)" in outcome and "Test top-1 on 40 images" in outcome and outcome.count("% ±") == 3
    constraints = md.split("## Constraints")[1].split("## Results")[0]
    assert "calibration split (50 images)" in constraints and "test split (40 images)" in constraints
    assert len(re.findall(r"\d+\.\d\d ± \d+\.\d\d points", constraints)) == 3


def test_a_policy_section_says_what_its_calibration_figures_rest_on(run):
    out, s, md = run
    section = md.split("## Uniform sweep")[1].split("\n## ")[0]
    assert "rest on the 50 calibration images" in section and "standard error of" in section


def test_one_format_per_column_and_no_1_epochs(run):
    out, s, md = run
    assert "1 epochs" not in md and "Fine-tuning: 1 epoch," in md
    results = md.split("## Results (test split)")[1].split("##")[0]
    rows = [ln.split("|") for ln in results.splitlines() if ln.startswith(("| dense", "| pruned", "| finetuned"))]
    sops, energy, latency = ([r[i].strip() for r in rows] for i in (9, 10, 11))
    latency = [re.sub(r"( ±\d+%)?( \?)?$", "", x) for x in latency]  # the interleaved timing's spread, unreliable mark
    assert all(re.fullmatch(r"[\d,]+", x) for x in sops), sops          # whole numbers, never 4.84e+06
    for column in (energy, latency):  # fixed decimals, the same in every row, enough for the smallest
        decimals = {len(x.split(".")[1]) for x in column}
        assert all(re.fullmatch(r"\d+\.\d+", x) for x in column) and len(decimals) == 1, column
        assert any(len(x.replace(".", "").lstrip("0")) >= 3 for x in column), column


def test_the_cost_section_splits_its_passes(run):
    out, s, md = run
    cost = md.split("## Cost")[1].split("##")[0]
    total = s["forward_cost"]["calib_evaluations_this_run"]
    policy = s["cost"]["policy_calib_passes"]
    assert f"in this session: {total:,} (" in cost
    assert f": {policy:,} while the policy ran" in cost and f"{total - policy:,} after it" in cost
    assert "pruned and fine-tuned models" in cost
    assert "Before is the dense model's width" in md


def test_with_error_is_the_binomial_standard_error():
    assert with_error(0.9, 100) == "90.00% ± 3.00"
    assert with_error(0.9, None) == "90.00%"


def test_group_kinds_put_every_block_together():
    assert group_kind("block11.mlp.hidden") == group_kind("block0.mlp.hidden") == "blockN.mlp.hidden"
    assert group_kind("residual") == "residual" and group_kind("stem.proj_conv1") == "stem.proj_conv1"


def _legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


@pytest.fixture
def keep_figures(monkeypatch):
    """The figures save_figure would close, kept open to be inspected."""
    kept = []
    import spikeprune.report as report_module

    def keep(fig, path):
        fig.canvas.draw()
        fig.savefig(path)
        kept.append(fig)
    monkeypatch.setattr(report_module, "save_figure", keep)
    yield kept
    for fig in kept:
        pyplot().close(fig)


def test_sensitivity_plot_one_panel_per_kind_each_with_the_limit(tmp_path, keep_figures):
    groups = ["residual"] + [f"block{b}.{k}" for b in range(3) for k in ("attn.qk", "mlp.hidden")]
    rows = {g: [{"ratio": r, "acc_drop": r * (i + 1), "memory_saved_frac": r / 10} for r in (0.1, 0.3, 0.5)]
            for i, g in enumerate(groups)}
    plot_sensitivity(tmp_path / "s.png", SimpleNamespace(groups=groups, for_group=rows.get), 2.0)
    fig = keep_figures[0]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 3  # residual, blockN.attn.qk, blockN.mlp.hidden
    for ax in panels:
        assert any(t.startswith("limit") for t in _legend_texts(ax))
        assert ax.get_xlim()[0] == 0
    qk = next(ax for ax in panels if "attn.qk" in ax.get_title())
    assert {"block0.attn.qk", "block1.attn.qk", "block2.attn.qk"} <= set(_legend_texts(qk))


def test_uniform_sweep_memory_axis_from_zero_and_tradeoff_limit_in_legend(tmp_path, keep_figures):
    plot_uniform_sweep(tmp_path / "u.png", [{"ratio": r, "top1": 0.9 - r / 5, "memory_saved_frac": 0.18 + r / 2}
                                            for r in (0.1, 0.3, 0.5)], 0.92, 3.0)
    ax, ax2 = keep_figures[0].axes
    assert ax2.get_ylim()[0] == 0
    assert any("limit" in t for t in _legend_texts(ax))
    summary = {"calib": {"dense_top1": 0.95, "pruned_top1": 0.92}, "memory_saved": 0.4, "policy": "p",
               "constraints": {"precision": "fp32"}}
    plot_tradeoff(tmp_path / "t.png", summary, {"sweep": [(0.1, 0.94), (0.3, 0.9)]}, 3.0)
    ax = keep_figures[1].axes[0]
    assert any("limit" in t for t in _legend_texts(ax)) and ax.get_xlim()[0] <= 0
    low, high = ax.get_ylim()
    assert low < 100 * 0.95 - 3.0 < high  # the limit line inside the axes, not on their edge


def test_step_labels_never_overprint_nor_leave_the_figure():
    fig, ax = new_figure()
    xs = [1 + 0.01 * i for i in range(40)]  # a dense cluster: many numbers compete for little room
    ys = [90 - 0.02 * i for i in range(40)]
    ax.plot(xs, ys, "o-")
    label_points(ax, xs, ys, [f"block{i % 4}.mlp.hidden" for i in range(40)], key_title="cut")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    numbers = [t for t in ax.texts if t.get_text().isdigit()]
    boxes = [t.get_window_extent(renderer) for t in numbers]
    assert numbers, "no point was numbered"
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        assert not any(a.overlaps(b) for b in boxes[i + 1:])
    key = [t for t in ax.texts if not t.get_text().isdigit()]
    assert "40. block3.mlp.hidden" in "".join(t.get_text() for t in key)
    assert all(t.get_window_extent(renderer).x0 >= frame.x1 for t in key)  # the key sits right of the axes
    pyplot().close(fig)
