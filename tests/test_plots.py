"""Figures: the plotted numbers are the tables' numbers, every kind renders, overlays and errors.

The checkpoints are real: the demo model trained by torch's AdamW (two param groups),
snapshots of one run at steps 30 and 60 (tests.conftest.demo_run), and small models
trained by other torch optimizers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection, QuadMesh
from matplotlib.contour import ContourSet
from matplotlib.patches import StepPatch

import ostate
from ostate.analysis import Sketch, summarize
from ostate.analysis.sketch import bucket_ids, bucket_values
from ostate.errors import OstateError
from ostate.figures import as_series, plot, plot_layer_profile, plot_lr_histogram, plot_moments
from ostate.optimizers.adam import max_snr, pure_noise_snr
from ostate.plots import get_kind, plot_kinds, save_figure
from ostate.plots.rebin import log_edges, rebin
from tests.helpers.common import REPO, Net, train


def _artists(ax, kind, prefix):
    return [a for a in ax.get_children() if isinstance(a, kind) and (a.get_gid() or "").startswith(prefix)]


def _panel(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def _kind_checkpoint(opt_factory, tmp_path, steps=5, name="ckpt.pt"):
    torch.manual_seed(0)
    model = Net(width=16)
    opt = opt_factory(model)
    train(model, opt, steps=steps)
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return str(path)


# ------------------------------------------------------------------------------ lr histogram
def test_histogram_bars_are_the_effective_lrs_counted_per_display_bin(demo_run):
    path = demo_run[-1]
    fig = plot_lr_histogram(path, by="kind")
    checkpoint = ostate.load(path)
    optimizer = checkpoint.optimizers[0]
    analysis = summarize(checkpoint)
    table = analysis.table("kind").set_index("param_kind")
    members = {row.key: row.members for row in analysis.rows("kind")}
    for kind in table.index:
        ax = _panel(fig, f"{kind} parameters")
        (bars,) = _artists(ax, StepPatch, "histogram|")
        counts, edges, _ = bars.get_data()
        # Every coordinate is drawn (no zero effective lr here) ...
        assert counts.sum() == table.loc[kind, "numel"]
        # ... in the bin of its bfloat16 bucket's midpoint: rebinning the raw values gives the same bars.
        raw = torch.cat(
            [
                ostate.effective_lr(p, optimizer.groups[p.group]).reshape(-1)
                for p in optimizer.params
                if p.name in members[kind]
            ]
        )
        midpoints = bucket_values(bucket_ids(raw).numpy())
        assert np.array_equal(counts, rebin(midpoints, np.ones(len(midpoints), np.int64), edges))
        (median,) = [line for line in ax.get_lines() if (line.get_gid() or "").startswith("median|")]
        assert median.get_xdata()[0] == table.loc[kind, "eff_lr_p50"]


def test_histogram_marks_the_lr_of_each_group_in_the_panel(demo_run):
    path = demo_run[0]
    fig = plot_lr_histogram(path, by="group")
    groups = ostate.load(path).optimizers[0].groups
    for g, group in enumerate(groups):
        ax = _panel(fig, f"group {g}")
        lrs = [line.get_xdata()[0] for line in ax.get_lines() if (line.get_gid() or "").startswith("lr|")]
        assert lrs == [group["lr"]]
    whole = _panel(fig, "whole model")
    # Both groups share one lr after the same schedule: marked once.
    assert len([ln for ln in whole.get_lines() if (ln.get_gid() or "").startswith("lr|")]) == 1


def test_whole_model_panel_holds_every_coordinate_with_state(demo_run):
    fig = plot_lr_histogram(demo_run[-1], by="model")
    (ax,) = fig.axes
    (bars,) = _artists(ax, StepPatch, "histogram|")
    optimizer = ostate.load(demo_run[-1]).optimizers[0]
    assert bars.get_data().values.sum() == sum(p.numel for p in optimizer.params if p.has_state)


def test_zero_effective_lrs_are_counted_and_said_not_drawn(tmp_path):
    # lr = 0 (e.g. the end of a schedule): every effective lr is 0, which a log axis cannot show.
    path = _kind_checkpoint(lambda m: torch.optim.Adam(m.parameters(), lr=0.0), tmp_path)
    fig = plot_lr_histogram(path, by="model")
    texts = [t.get_text() for t in fig.axes[0].texts]
    coords = sum(p.numel for p in ostate.load(path).optimizers[0].params)
    assert any(f"not drawn: {coords:,} zero" in t for t in texts)


def test_display_edges_cover_values_at_exact_powers_of_ten():
    edges = log_edges([1e-3, 1.0, 0.5])
    assert edges[0] <= 1e-3 and edges[-1] > 1.0
    counts = rebin(np.array([1e-3, 1.0]), np.array([5, 7]), edges)
    assert counts.sum() == 12 and counts[0] == 5 and counts[-1] == 7


# ------------------------------------------------------------------------------ layer profile
def test_layer_profile_by_layer_is_the_layer_tables_median_and_band(demo_run):
    path = demo_run[-1]
    fig = plot_layer_profile(path, by="layer")
    ax = fig.axes[0]
    table = summarize(ostate.load(path)).table("layer")
    layers = [t.get_text() for t in ax.get_xticklabels()]
    assert layers == list(table["layer"])  # model order, every layer named
    (line,) = _artists(ax, type(ax.get_lines()[0]), "median|")
    x = line.get_xdata().astype(int)
    assert np.array_equal(line.get_ydata(), table["eff_lr_p50"].to_numpy()[x])
    (band,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    lows = [segment[0][1] for segment in band.get_segments()]
    highs = [segment[1][1] for segment in band.get_segments()]
    assert np.allclose(lows, table["eff_lr_p5"].to_numpy()[x], rtol=0, atol=0)
    assert np.allclose(highs, table["eff_lr_p95"].to_numpy()[x], rtol=0, atol=0)


def test_layer_profile_by_kind_has_one_line_per_kind_with_that_kinds_quantiles(demo_run):
    path = demo_run[-1]
    fig = plot_layer_profile(path)
    ax = fig.axes[0]
    layers = [t.get_text() for t in ax.get_xticklabels()]
    params = summarize(ostate.load(path)).rows("param")
    lines = {
        line.get_gid().split("|")[-1]: line for line in ax.get_lines() if (line.get_gid() or "").startswith("median|")
    }
    assert set(lines) == {row.row["param_kind"] for row in params}
    for kind, line in lines.items():
        for x, y in zip(line.get_xdata().astype(int), line.get_ydata()):
            members = [r for r in params if r.row["layer"] == layers[x] and r.row["param_kind"] == kind]
            if len(members) == 1:  # the parameter's own table value
                assert y == members[0].row["eff_lr_p50"]
            else:
                assert y == Sketch.merged([r.sketches["eff_lr"] for r in members]).quantile(0.5)


def test_layer_profile_aligns_layers_of_different_checkpoints_by_name(tmp_path):
    def save(model, name):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / name)
        return str(tmp_path / name)

    torch.manual_seed(0)
    small = save(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), "small.pt")
    large = save(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)),
        "large.pt",
    )
    fig = plot_layer_profile([small, large], by="layer")
    ax = fig.axes[0]
    layers = [t.get_text() for t in ax.get_xticklabels()]
    assert layers == ["0", "1", "2", "3"]
    for path, label in ((small, "small.pt"), (large, "large.pt")):
        (line,) = [ln for ln in ax.get_lines() if ln.get_gid() == f"median|{label}|all"]
        table = summarize(ostate.load(path)).table("layer").set_index("layer")
        drawn = {layers[int(x)]: y for x, y in zip(line.get_xdata(), line.get_ydata())}
        assert drawn == table["eff_lr_p50"].to_dict()


# ------------------------------------------------------------------------------ moments
def test_moments_histogram_holds_every_coordinate_with_state(demo_run):
    path = demo_run[-1]
    fig = plot_moments(path)
    checkpoint = ostate.load(path)
    optimizer = checkpoint.optimizers[0]
    rows = summarize(checkpoint, joint=True).rows("group")
    for g, row in enumerate(rows):
        ax = [a for a in fig.axes if a.get_title().startswith(f"group {g}:")][0]
        (mesh,) = _artists(ax, QuadMesh, "joint|")
        joint = row.joints["moments"]
        with_state = sum(p.numel for p in optimizer.params if p.has_state and p.group == g)
        assert joint.total == with_state
        drawn = int(mesh.get_array().sum())
        assert drawn + joint.zero_x + joint.zero_y_only + joint.nonfinite == with_state
        if joint.zero_x:  # the demo's unused characters: their embedding rows never had a gradient
            assert any(f"{joint.zero_x:,} with v̂ = 0" in t.get_text() for t in ax.texts)


def test_moments_reference_lines_use_the_groups_betas_and_step(tmp_path):
    path = _kind_checkpoint(
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.8, 0.99), eps=1e-3), tmp_path, steps=6
    )
    ax = plot_moments(path).axes[0]
    lines = {line.get_gid(): line for line in ax.get_lines()}
    for gid, slope in (("noise", pure_noise_snr(0.8, 6)), ("bound", max_snr(0.8, 0.99, 6))):
        x, y = lines[gid].get_xdata(), lines[gid].get_ydata()
        assert np.allclose(y / x, slope, rtol=1e-12)
    assert lines["eps"].get_xdata()[0] == 1e-3  # Adam adds eps to sqrt(v_hat)
    assert ax.get_title() == "group 0: betas (0.8, 0.99), eps 0.001, step 6"


def test_radam_eps_line_accounts_for_eps_on_the_uncorrected_root(tmp_path):
    path = _kind_checkpoint(lambda m: torch.optim.RAdam(m.parameters(), lr=1e-3, eps=1e-3), tmp_path, steps=5)
    ax = plot_moments(path).axes[0]
    (eps,) = [line for line in ax.get_lines() if line.get_gid() == "eps"]
    assert eps.get_xdata()[0] == pytest.approx(1e-3 / (1 - 0.999**5) ** 0.5, rel=1e-12)


@pytest.mark.parametrize("family", ["NAdam", "RAdam", "bitsandbytes.AdamW8bit"])
def test_moments_of_other_adam_style_families_count_every_coordinate(family, tmp_path):
    if family.startswith("bitsandbytes"):
        pytest.importorskip("bitsandbytes")
    from tests.helpers.families import save, trained

    model, opt = trained(family)
    save(tmp_path / "ckpt.pt", model, opt)
    fig = plot_moments(str(tmp_path / "ckpt.pt"), by="model")
    (mesh,) = _artists(fig.axes[0], QuadMesh, "joint|")
    optimizer = ostate.load(tmp_path / "ckpt.pt").optimizers[0]
    joint = summarize(optimizer, joint=True).rows("model")[0].joints["moments"]
    assert joint.total == sum(p.numel for p in optimizer.params if p.has_state)
    assert int(mesh.get_array().sum()) == joint.total - joint.zero_x - joint.zero_y_only - joint.nonfinite


@pytest.mark.parametrize(
    "factory",
    [lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), lambda m: torch.optim.Adamax(m.parameters())],
    ids=["SGD", "Adamax"],
)
def test_moments_of_state_without_both_moving_averages_is_refused_with_what_to_do(factory, tmp_path):
    path = _kind_checkpoint(factory, tmp_path)
    with pytest.raises(OstateError) as error:
        plot_moments(path)
    message = str(error.value)
    assert "nothing to draw in a moments plot" in message and "AdamW" in message
    assert "kind=lr-histogram" in message and path in message


def test_a_moments_panel_mixing_different_betas_is_refused(tmp_path):
    torch.manual_seed(0)
    model = Net()
    params = list(model.parameters())
    opt = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "betas": (0.9, 0.95)}], lr=1e-3)
    train(model, opt)
    checkpoint = ostate.from_state_dict(opt.state_dict(), model=model)
    assert len(plot_moments(checkpoint, by="group").axes) >= 2  # one set of lines per group: fine
    with pytest.raises(OstateError, match="different betas or eps.*by=group"):
        plot_moments(checkpoint, by="model")


def test_an_analysis_without_the_joint_histogram_is_refused_for_moments(demo_run):
    analysis = summarize(ostate.load(demo_run[0]))
    with pytest.raises(OstateError, match=r"joint=True"):
        plot_moments(analysis)
    assert plot_moments(summarize(ostate.load(demo_run[0]), joint=True)).axes


# ------------------------------------------------------------------------------ overlays
@pytest.mark.parametrize("kind", sorted(plot_kinds()))
def test_an_overlay_has_one_series_per_checkpoint(kind, demo_run):
    fig = plot(kind, demo_run)
    labels = {"checkpoint-30.pt", "checkpoint-60.pt"}
    for ax in fig.axes:
        gids = {a.get_gid() for a in ax.get_children() if a.get_gid()}
        if kind == "lr-histogram":
            assert {g for g in gids if g.startswith("histogram|")} == {f"histogram|{label}" for label in labels}
            assert {g for g in gids if g.startswith("median|")} == {f"median|{label}" for label in labels}
        elif kind == "layer-profile":
            assert {g.split("|")[1] for g in gids if g.startswith("median|")} == labels
        elif ax.get_title().startswith("group"):
            contours = [a for a in ax.get_children() if isinstance(a, ContourSet)]
            assert {c.get_gid() for c in contours} == {f"contours|{label}" for label in labels}


def test_labels_are_the_paths_shortened_or_given(demo_run, tmp_path):
    assert [s.label for s in as_series(demo_run)] == ["checkpoint-30.pt", "checkpoint-60.pt"]
    analyses = [summarize(ostate.load(p)) for p in demo_run]
    assert [s.label for s in as_series(analyses)] == ["checkpoint 1", "checkpoint 2"]
    assert [s.label for s in as_series(analyses, labels=["early", "late"])] == ["early", "late"]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    (in_memory,) = as_series(ostate.from_state_dict(opt.state_dict(), model=model))
    assert in_memory.label == "" and in_memory.describe() == "AdamW, step 1"  # no file, no path in the title


# ------------------------------------------------------------------------------ every kind, every format
@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("svg", b"<svg"), ("pdf", b"%PDF")])
def test_every_kind_renders_to_every_format(fmt, magic, demo_run, tmp_path):
    for kind in plot_kinds():
        inputs = demo_run if kind == "compare" else demo_run[0]  # compare needs two checkpoints
        out = save_figure(plot(kind, inputs), tmp_path / f"{kind}.{fmt}")
        head = open(out, "rb").read(4096)
        assert magic in head, (kind, fmt)


def test_every_kind_says_which_views_it_draws_and_refuses_others(demo_run):
    assert get_kind("lr-histogram").views[0] == "kind" and get_kind("moments").views[0] == "group"
    with pytest.raises(OstateError, match="cannot be split by=model"):
        plot("layer-profile", demo_run[0], by="model")
    with pytest.raises(OstateError, match="unknown plot kind 'violin'.*lr-histogram"):
        plot("violin", demo_run[0])


def test_an_unsupported_figure_format_is_refused(demo_run, tmp_path):
    with pytest.raises(OstateError, match="unsupported figure format"):
        save_figure(plot("lr-histogram", demo_run[0]), tmp_path / "lr.jpg")
    assert not (tmp_path / "lr.jpg").exists()


@pytest.mark.slow
def test_plotting_needs_no_display_and_never_touches_pyplot(demo_run, tmp_path):
    script = (
        "import sys; from ostate.figures import plot; from ostate.plots import save_figure\n"
        f"for kind in ('lr-histogram', 'layer-profile', 'moments'):\n"
        f"    save_figure(plot(kind, {demo_run[0]!r}), {str(tmp_path)!r} + '/' + kind + '.png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "import matplotlib; print(matplotlib.get_backend())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["layer-profile.png", "lr-histogram.png", "moments.png"]


def test_a_layer_profile_with_nothing_to_draw_says_why():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    for state in opt.state.values():
        state["exp_avg_sq"].fill_(float("nan"))
    fig = plot_layer_profile(ostate.from_state_dict(opt.state_dict(), model=model))
    assert not [ln for ln in fig.axes[0].get_lines() if (ln.get_gid() or "").startswith("median|")]
    assert any(t.get_text().startswith("not drawn: no layer") for t in fig.axes[0].texts)


# ------------------------------------------------------------------------------ layers
def test_the_plots_draw_analyses_and_the_figures_module_reads_the_paths(demo_run):
    import ostate.plots

    analyses = [summarize(ostate.load(p)) for p in demo_run]
    drawn = ostate.plots.plot("lr-histogram", analyses, labels=["checkpoint-30.pt", "checkpoint-60.pt"])
    read = plot("lr-histogram", demo_run)
    for ax_drawn, ax_read in zip(drawn.axes, read.axes, strict=True):
        bars = {a.get_gid(): a.get_data().values for a in _artists(ax_drawn, StepPatch, "histogram|")}
        assert bars and bars.keys() == {a.get_gid() for a in _artists(ax_read, StepPatch, "histogram|")}
        for a in _artists(ax_read, StepPatch, "histogram|"):
            assert np.array_equal(a.get_data().values, bars[a.get_gid()])
    with pytest.raises(OstateError, match="cannot plot a str.*ostate.figures"):
        ostate.plots.plot("lr-histogram", demo_run[0])
    with pytest.raises(OstateError, match="draws a comparison, not a list.*ostate.figures.plot"):
        ostate.plots.plot("compare", demo_run)


def test_no_module_of_the_plots_package_reads_checkpoints():
    import ast
    import pathlib

    import ostate.plots.registry

    found = {}
    for path in sorted(pathlib.Path(ostate.plots.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        only_typing = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and id(node) not in only_typing:
                found.setdefault(path.name, set()).add(node.module)
            elif isinstance(node, ast.Import) and id(node) not in only_typing:
                found.setdefault(path.name, set()).update(a.name for a in node.names)
    for name, modules in found.items():
        assert not [
            m
            for m in modules
            if m.startswith(
                ("ostate.loading", "ostate.formats", "ostate.convert", "ostate.compare", "importlib", "pkgutil")
            )
        ], name
    assert [kind.name for kind in ostate.plots.registry.KINDS] == sorted(plot_kinds())


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adagrad(p, lr=0.1), lambda p: torch.optim.RMSprop(p, lr=0.01)])
def test_the_lr_histogram_of_a_family_without_m_hat_says_what_eta_multiplies(make):
    from ostate.analysis import summarize
    from ostate.plots import plot_lr_histogram

    model = torch.nn.Linear(4, 3)
    opt = make(model.parameters())
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    fig = plot_lr_histogram(summarize(ostate.from_state_dict(opt.state_dict(), model=model)))
    label = fig._supxlabel.get_text()
    assert "gradient or momentum buffer" in label and "hat m" not in label


def test_an_sgd_lr_histogram_says_every_coordinate_is_at_lr_instead_of_a_flat_block():
    from ostate.analysis import summarize
    from ostate.plots import plot_lr_histogram

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    fig = plot_lr_histogram(summarize(ostate.from_state_dict(opt.state_dict(), model=model)))
    whole = fig.axes[0]
    assert [t.get_text() for t in whole.texts] == ["every coordinate is at lr = 0.05"]
    assert not whole.patches  # no histogram drawn
