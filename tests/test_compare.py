"""ostate compare on real checkpoints of one training run, recomputed here with plain torch."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import ostate
from ostate.analysis.sketch import RELATIVE_ERROR
from ostate.compare.compute import MOVER_METRIC, compare
from ostate.figures import plot
from ostate.plots.compare import compare_figure
from ostate.reset.write import reset
from tests.helpers.common import run_cli


class Mlp(nn.Module):
    def __init__(self, out: int = 3):
        super().__init__()
        self.inp = nn.Linear(4, 32)
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, out)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def run(tmp_path, steps=(3, 6), frozen=None):
    """One AdamW run, saved after each count of steps in ``steps``; ``frozen`` gets no gradient after the first save."""
    torch.manual_seed(0)
    model = Mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    paths, states, done = [], [], 0
    for target in steps:
        while done < target:
            opt.zero_grad()
            model(torch.randn(16, 4, generator=g)).square().mean().backward()
            if done >= steps[0] and frozen is not None:
                for p in frozen(model).parameters():
                    p.grad = None  # Adam leaves a parameter without a gradient untouched
            opt.step()
            done += 1
        paths.append(tmp_path / f"step{target}.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, paths[-1])
        states.append(torch.load(paths[-1], weights_only=True)["optimizer"])
    return model, paths, states


def test_every_figure_equals_the_plain_torch_computation(tmp_path):
    model, (a, b), (sa, sb) = run(tmp_path)
    table = compare(a, b).pairs[0].table().set_index("name")
    names = [n for n, _ in model.named_parameters()]
    for index, name in enumerate(names):
        ma, mb = sa["state"][index]["exp_avg"].double(), sb["state"][index]["exp_avg"].double()
        va, vb = sa["state"][index]["exp_avg_sq"].double(), sb["state"][index]["exp_avg_sq"].double()
        row = table.loc[name]
        assert row["status"] == "both" and row["step_delta"] == 3
        assert row["m_cosine"] == pytest.approx(float((ma * mb).sum() / (ma.norm() * mb.norm())), rel=1e-12)
        log_ratio = torch.log10(vb / va).reshape(-1)
        median = float(torch.quantile(log_ratio, 0.5, interpolation="lower"))
        assert row["log10_v_ratio_p50"] == pytest.approx(median, rel=2 * RELATIVE_ERROR, abs=1e-7)
        eff_a = ostate.effective_lr(ostate.load(a).optimizers[0].params[index], sa["param_groups"][0]).double()
        eff_b = ostate.effective_lr(ostate.load(b).optimizers[0].params[index], sb["param_groups"][0]).double()
        log_eff = torch.log10(eff_b / eff_a).reshape(-1)
        assert row[MOVER_METRIC] == pytest.approx(float(log_eff.square().mean().sqrt()), rel=1e-5)
        expected_change = 10 ** float(torch.quantile(log_eff, 0.5, interpolation="lower")) - 1
        assert row["eff_lr_relchange_p50"] == pytest.approx(expected_change, rel=0.01, abs=1e-6)
        assert row["unchanged_frac"] == 0.0


def test_a_parameter_that_got_no_gradient_is_unchanged_and_its_step_did_not_move(tmp_path):
    _, (a, b), _ = run(tmp_path, frozen=lambda m: m.head)
    table = compare(a, b).pairs[0].table().set_index("name")
    assert list(table.loc[["head.weight", "head.bias"], "unchanged_frac"]) == [1.0, 1.0]
    assert list(table.loc[["head.weight", "head.bias"], "step_delta"]) == [0.0, 0.0]
    assert table.loc["head.weight", "m_cosine"] == pytest.approx(1.0)
    assert (table.loc[["inp.weight", "hidden.weight"], "unchanged_frac"] == 0).all()


def test_a_reset_checkpoint_shows_what_the_strategy_changed(tmp_path):
    _, (a, _b), _ = run(tmp_path)
    out = tmp_path / "reset.pt"
    reset(a, out, "reset-v", params=r"^head\.")
    table = compare(a, out).pairs[0].table().set_index("name")
    head = table.loc["head.weight"]
    assert head["v_zero_b"] == head["numel"] and head["v_zero_a"] == 0 and math.isnan(head["log10_v_ratio_p50"])
    assert head["m_cosine"] == pytest.approx(1.0) and head["eff_lr_relchange_p50"] > 1.0
    assert (table.drop(index=["head.weight", "head.bias"])["unchanged_frac"] == 1.0).all()


def test_the_same_state_in_another_format_compares_as_unchanged(tmp_path):
    _, (a, _b), _ = run(tmp_path)
    converted = tmp_path / "opt.safetensors"
    ostate.convert(a, converted)
    pair = compare(a, converted).pairs[0]
    assert (pair.table()["unchanged_frac"] == 1.0).all() and pair.model.row["m_cosine"] == pytest.approx(1.0)


def test_parameters_in_one_checkpoint_only_or_reshaped_are_reported_as_such(tmp_path):
    _, (a, _b), _ = run(tmp_path)
    torch.manual_seed(1)
    other = Mlp(out=5)
    other.extra = nn.Linear(2, 2)
    opt = torch.optim.AdamW(other.named_parameters())  # names from param_names
    opt.zero_grad()
    (other(torch.randn(3, 4)).square().mean() + other.extra(torch.randn(3, 2)).sum()).backward()
    opt.step()
    path = tmp_path / "other.pt"
    torch.save({"optimizer": opt.state_dict()}, path)
    statuses = compare(a, path).pairs[0].table().set_index("name")["status"].to_dict()
    assert statuses == {
        "inp.weight": "both",
        "inp.bias": "both",
        "hidden.weight": "both",
        "hidden.bias": "both",
        "head.weight": "shape differs",
        "head.bias": "shape differs",
        "extra.weight": "only in B",
        "extra.bias": "only in B",
    }


def test_several_checkpoints_pair_consecutively_or_against_the_first(tmp_path):
    _, paths, _ = run(tmp_path, steps=(2, 4, 7))
    consecutive = compare(*paths)
    assert [(p.a, p.b) for p in consecutive.pairs] == [(str(paths[0]), str(paths[1])), (str(paths[1]), str(paths[2]))]
    first = compare(*paths, against="first")
    assert [(p.a, p.b) for p in first.pairs] == [(str(paths[0]), str(paths[1])), (str(paths[0]), str(paths[2]))]
    assert first.pairs[1].table()["step_delta"].eq(5).all()
    assert set(first.table()[["a", "b"]].itertuples(index=False, name=None)) == {
        (str(paths[0]), str(paths[1])),
        (str(paths[0]), str(paths[2])),
    }


def test_movers_are_ranked_by_the_documented_metric_and_workers_do_not_change_numbers(tmp_path):
    _, (a, b), _ = run(tmp_path)
    one, four = compare(a, b, workers=1).pairs[0], compare(a, b, workers=4).pairs[0]
    assert one.table().equals(four.table())
    movers = one.movers(3)
    table = one.table().sort_values(MOVER_METRIC, ascending=False)
    assert list(movers["name"]) == list(table["name"][:3])


def test_cli_formats_and_the_plot(tmp_path):
    _, paths, _ = run(tmp_path, steps=(2, 4, 7))
    result = run_cli("compare", *map(str, paths), "--format", "json", "--top", "2")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["mover_metric"] == MOVER_METRIC and len(data["pairs"]) == 2 and len(data["pairs"][0]["movers"]) == 2
    assert data["pairs"][0]["params"][0]["name"] == "inp.weight"
    csv = run_cli("compare", str(paths[0]), str(paths[1]), "--format", "csv").stdout
    assert csv.splitlines()[0].startswith("a,b,name,status,shape")
    table = run_cli("compare", str(paths[0]), str(paths[1]), "--plot", str(tmp_path / "cmp.png"))
    assert "largest movers (by eff_lr_log10_rms)" in table.stdout and (tmp_path / "cmp.png").stat().st_size > 10_000
    markdown = run_cli("compare", str(paths[0]), str(paths[1]), "--format", "markdown", "--columns", "name,m_cosine")
    assert "| name | m_cosine |" in markdown.stdout
    bad = run_cli("compare", str(paths[0]))
    assert bad.returncode == 2 and "at least two" in bad.stderr


def test_the_figure_has_a_panel_per_statistic_and_a_point_per_parameter(tmp_path):
    _, paths, _ = run(tmp_path, steps=(2, 4, 7))
    fig = compare_figure(compare(*paths))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["second moment", "first moment", "effective learning rate", "state not changed"]
    cosine_points = [line for line in fig.axes[1].get_lines()]
    assert len(cosine_points) == 2 and len(cosine_points[0].get_xdata()) == 6  # two pairs, six parameters
    assert [t.get_text() for t in fig.axes[3].get_xticklabels()][:2] == ["inp.weight", "inp.bias"]


def test_ostate_plot_kind_compare_plots_the_comparison_tables_numbers(tmp_path):
    _, paths, _ = run(tmp_path, steps=(2, 4, 7))
    fig = plot("compare", [str(p) for p in paths], by="first")
    tables = [pair.table().set_index("name") for pair in compare(*paths, against="first").pairs]
    for line, table in zip(fig.axes[1].get_lines(), tables):  # one cosine series per pair, in order
        assert list(line.get_ydata()) == pytest.approx(list(table.loc[table["status"] == "both", "m_cosine"]))
    out = run_cli("plot", *map(str, paths), "--kind", "compare", "-o", str(tmp_path / "cmp.svg"))
    assert out.returncode == 0 and (tmp_path / "cmp.svg").stat().st_size > 10_000
    wrong = run_cli(
        "plot", str(paths[0]), str(paths[1]), "--kind", "compare", "--by", "layer", "-o", str(tmp_path / "x.png")
    )
    assert wrong.returncode == 2 and "consecutive, first" in wrong.stderr and not (tmp_path / "x.png").exists()


def test_the_compare_figure_of_plain_sgd_says_what_it_cannot_draw(tmp_path):
    # SGD without momentum keeps no moments: the figure used to fail on the missing columns.
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    paths = []
    for step in range(2):
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        paths.append(tmp_path / f"sgd{step}.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, paths[-1])
    fig = compare_figure(compare(*paths))
    notes = [t.get_text() for t in fig.axes[0].texts]
    assert notes == ["nothing to draw: no second moment in both checkpoints"]
    # No zero line through the text (the only line is the all-NaN series).
    assert not any(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any() for line in fig.axes[0].get_lines())
    assert not fig.axes[1].texts  # momentum buffers are first moments: their cosine is drawn
    # Two checkpoints: the pair is named, on the first panel that has data.
    assert fig.axes[0].get_legend() is None
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["sgd0.pt → sgd1.pt"]


def test_the_compare_figure_of_two_checkpoints_names_them(tmp_path):
    _, paths, _ = run(tmp_path, steps=(2, 4))
    fig = compare_figure(compare(*paths))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [f"{paths[0].name} → {paths[1].name}"]


def test_compare_plot_never_writes_over_or_into_an_input(tmp_path):
    _, paths, _ = run(tmp_path)
    disguised = tmp_path / "a.png"
    disguised.write_bytes(paths[0].read_bytes())
    before = disguised.read_bytes()
    out = run_cli("compare", str(disguised), str(paths[1]), "--plot", str(disguised))
    assert out.returncode == 2 and "over or into the input" in out.stderr
    assert disguised.read_bytes() == before
    wrong = run_cli("compare", str(paths[0]), str(paths[1]), "--plot", str(tmp_path / "c.gif"))
    assert wrong.returncode == 2 and not (tmp_path / "c.gif").exists()


def test_the_plots_package_draws_a_computed_comparison_and_checks_its_pairing(tmp_path):
    import ostate.plots

    _, paths, _ = run(tmp_path, steps=(2, 4, 7))
    result = compare(*paths, against="first")
    fig = ostate.plots.plot("compare", result)
    tables = [pair.table().set_index("name") for pair in result.pairs]
    for line, table in zip(fig.axes[1].get_lines(), tables, strict=True):
        assert list(line.get_ydata()) == pytest.approx(list(table.loc[table["status"] == "both", "m_cosine"]))
    assert ostate.plots.plot("compare", result, by="first").axes
    with pytest.raises(ostate.OstateError, match="pairs its checkpoints first, not consecutive"):
        ostate.plots.plot("compare", result, by="consecutive")
    with pytest.raises(ostate.OstateError, match="cannot be split by=layer"):
        ostate.plots.plot("compare", result, by="layer")


def test_two_checkpoints_without_a_parameter_in_common_warn_and_exit_2(tmp_path):
    paths = []
    for name, model in (("a.pt", torch.nn.Linear(3, 2)), ("b.pt", torch.nn.Sequential(torch.nn.Linear(3, 2)))):
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / name)
        paths.append(str(tmp_path / name))
    pair = compare(*paths).pairs[0]
    assert pair.no_common_parameter() is not None and pair.no_common_parameter() in pair.warnings
    result = run_cli("compare", *paths)
    assert result.returncode == 2
    assert result.stderr.startswith("ostate: error: ") and "no parameter name in common" in result.stderr
    assert "A: weight, bias; B: 0.weight, 0.bias" in result.stderr


def _finished_schedule(tmp_path):
    """Three saves of AdamW whose schedule reaches lr = 0 at the last one (a 40x30 weight: not batched as tiny)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Linear(40, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / 3))
    paths = []
    for step in range(3):
        model(torch.randn(8, 30)).square().sum().backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
        paths.append(tmp_path / f"s{step}.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, paths[-1])
    assert opt.param_groups[0]["lr"] == 0.0
    return paths


def _preconditioner(path, name):
    sd = torch.load(path, weights_only=True)["optimizer"]
    index = ["0.weight", "0.bias", "1.weight", "1.bias"].index(name)
    state, beta2 = sd["state"][index], sd["param_groups"][0]["betas"][1]
    v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** float(state["step"]))
    return 1.0 / (v_hat.sqrt() + sd["param_groups"][0]["eps"])


def test_a_finished_schedule_compares_the_preconditioner_and_says_why_eff_lr_is_blank(tmp_path):
    paths = _finished_schedule(tmp_path)
    pair = compare(paths[1], paths[2]).pairs[0]
    assert any("is 0 in some param group (a finished schedule)" in w for w in pair.warnings)
    assert pair.mover_metric() == "precond_log10_rms"
    table = pair.table().set_index("name")
    assert table["eff_lr_relchange_p50"].isna().all()
    change = (_preconditioner(paths[2], "0.weight") / _preconditioner(paths[1], "0.weight")).median().item() - 1
    assert table.loc["0.weight", "precond_relchange_p50"] == pytest.approx(change, rel=0.02, abs=1e-3)
    text = run_cli("compare", str(paths[1]), str(paths[2])).stdout
    assert "largest movers (by precond_log10_rms)" in text and "finished schedule" in text
