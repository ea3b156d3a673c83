"""What a referee checks in the harness's answers: failures counted, censored steps to target,
multiple comparisons, robust aggregates, bounded intervals, forgetting, reproducible trial ids,
atomic claiming. Statistics are checked against SciPy."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest

from ostate.harness import ResultsStore, Spec, Sweep, Task, TrialConfig, run, run_trial, summarize_trials
from ostate.harness.progress import Progress
from ostate.harness.stats import (
    bootstrap_interval,
    fisher_exact_p,
    holm,
    iqm,
    kaplan_meier,
    probability_of_improvement,
    seeds_needed,
    survival_summary,
    wilcoxon_p,
)
from ostate.harness.text import render_summary
from ostate.harness.trial import lr_factor
from tests.helpers import harness_tasks as ht

stats = pytest.importorskip("scipy.stats")


def test_fisher_exact_matches_scipy():
    for a, n_a, b, n_b in [(3, 5, 0, 5), (1, 6, 4, 6), (0, 3, 0, 3), (5, 8, 2, 9)]:
        expected = stats.fisher_exact([[a, n_a - a], [b, n_b - b]]).pvalue
        assert fisher_exact_p(a, n_a, b, n_b) == pytest.approx(expected, rel=1e-9)


def test_iqm_matches_scipys_trimmed_mean():
    rng = np.random.default_rng(0)
    for n in (3, 4, 5, 8, 13):
        x = rng.normal(size=n)
        assert iqm(x.tolist()) == pytest.approx(stats.trim_mean(x, 0.25), rel=1e-12)


def test_probability_of_improvement_is_mann_whitney_u_over_nm():
    x, y = [0.5, 1.0, 1.0, 2.5], [1.0, 1.5, 3.0]
    u = stats.mannwhitneyu(y, x).statistic  # pairs where y > x, ties half
    assert probability_of_improvement(x, y) == pytest.approx(u / (len(x) * len(y)))
    assert probability_of_improvement([math.inf], [1.0]) == 0.0  # a failed run loses


def test_wilcoxon_with_a_failed_run_ranks_it_worst_like_scipy_with_a_huge_difference():
    diffs = [0.1, -0.2, 0.3, 0.4, math.inf, 0.5]
    replaced = [d if math.isfinite(d) else 1e9 for d in diffs]
    assert wilcoxon_p(diffs) == pytest.approx(stats.wilcoxon(replaced, method="exact").pvalue)


def test_holm_matches_its_definition():
    p = [0.01, 0.04, 0.03, 0.2]
    m = len(p)
    order = np.argsort(p)
    expected = np.maximum.accumulate([min(1, (m - k) * p[i]) for k, i in enumerate(order)])
    out = holm(p)
    assert [out[i] for i in order] == pytest.approx(list(expected))


def test_kaplan_meier_matches_scipys_censored_ecdf():
    times = [20, 40, 40, 60, 80, 100, 100]
    reached = [True, True, False, True, False, True, False]
    data = stats.CensoredData.right_censored(times, [not r for r in reached])
    sf = stats.ecdf(data).sf
    for t, survival, _ in kaplan_meier(times, reached):
        assert survival == pytest.approx(float(sf.evaluate(t)))
    summary = survival_summary(times, reached, horizon=100)
    grid = np.arange(0, 100, 0.5)
    assert summary.rmst == pytest.approx(float(np.sum(sf.evaluate(grid)) * 0.5), rel=1e-9)
    assert 0 <= summary.lo <= summary.rmst <= summary.hi <= 100


def test_seeds_needed_reaches_the_power_by_scipys_noncentral_t():
    for mean, std in ((1.0, 1.0), (0.2, 0.5), (1.0, 3.0)):
        n = seeds_needed(mean, std)

        def power(k, mean=mean, std=std):
            crit = stats.t.ppf(0.975, k - 1)
            delta = mean / (std / math.sqrt(k))
            return stats.nct.sf(crit, k - 1, delta) + stats.nct.cdf(-crit, k - 1, delta)

        assert power(n) >= 0.78 and power(max(2, n - 2)) < 0.8


def test_bootstrap_interval_stays_inside_the_values():
    lo, hi = bootstrap_interval([0.9, 1.0, 1.0, 0.95])
    assert 0.9 <= lo <= hi <= 1.0


def _frames(finals: dict[str, list[float]], *, accuracy: dict[str, list[float]] | None = None, steps: int = 4):
    """Trials and records as the store gives them: eval losses at steps 0, 2, 4 ending at ``finals``
    (NaN: a diverged run)."""
    trials, records = [], []
    for strategy, values in finals.items():
        for seed, final in enumerate(values):
            tid = f"{strategy}-{seed}"
            trials.append(
                dict(
                    trial_id=tid,
                    strategy=strategy,
                    seed=seed,
                    lr=1e-3,
                    warmup=0,
                    batch_size=8,
                    schedule="cosine",
                    steps=steps,
                    grad_clip=0.0,
                    beta2=0.0,
                    replay=0.0,
                )
            )
            if math.isnan(final):
                records += [(tid, 0, "eval_loss", -1, 2.0), (tid, 1, "train_loss", -1, math.inf)]
                continue
            records += [(tid, 0, "eval_loss", -1, 2.0), (tid, 2, "eval_loss", -1, (2.0 + final) / 2)]
            records += [(tid, 4, "eval_loss", -1, final), (tid, 4, "source_loss", -1, 1.0 + 0.1 * seed)]
            if accuracy:
                records.append((tid, 4, "eval_accuracy", -1, accuracy[strategy][seed]))
    return pd.DataFrame(trials), pd.DataFrame(records, columns=["trial_id", "step", "metric", "grp", "value"])


def test_a_strategy_that_failed_in_most_seeds_is_not_reported_better_than_reload():
    nan = math.nan
    trials, records = _frames({"reload": [1.0, 1.1, 1.2, 1.05, 1.15], "reset-v": [0.5, nan, nan, 0.6, nan]})
    summary = summarize_trials(trials, records)
    row = summary.strategies.set_index("strategy").loc["reset-v"]
    assert row["failed"] == 3 and row["n"] == 5
    final = summary.paired[(summary.paired["quantity"] == "final")].iloc[0]
    assert final["prob_improvement"] == pytest.approx(2 / 5)  # wins 2 x 5 pairs, loses 3 x 5
    assert final["p_failed"] == pytest.approx(stats.fisher_exact([[3, 2], [0, 5]]).pvalue)
    # the failed runs rank worst: three of the five largest differences favour reload
    assert final["p_wilcoxon"] == pytest.approx(wilcoxon_p([-0.5, math.inf, math.inf, -0.45, math.inf]))
    assert "p_holm" in summary.paired and (summary.paired["p_holm"] >= summary.paired["p_t"]).all()
    assert "best on the target: reload" in summary.verdicts[0]
    assert any("Wilcoxon" in w for w in summary.warnings)


def test_steps_to_target_is_censored_and_its_interval_never_negative():
    trials, records = _frames({"reload": [1.0, 1.0, 1.0], "fresh": [0.9, 1.5, 1.6]})
    summary = summarize_trials(trials, records)
    row = summary.strategies.set_index("strategy").loc["fresh"]
    assert row["reached"] == 1
    assert 0 <= row["to_target_rmst_lo"] <= row["to_target_rmst"] <= row["to_target_rmst_hi"] <= 4


def test_a_bounded_metric_keeps_its_interval_in_range_and_two_seeds_say_too_few():
    trials, records = _frames(
        {"reload": [1.0, 1.1], "fresh": [0.9, 1.0]},
        accuracy={"reload": [0.354, 0.9], "fresh": [0.5, 0.99]},
    )
    summary = summarize_trials(trials, records)
    table = summary.strategies
    assert (table["final_accuracy_lo"] >= 0).all() and (table["final_accuracy_hi"] <= 1).all()
    text = render_summary(summary)
    assert "(n<3)" in text and "± 2.4" not in text


def _task(source, **changes):
    parts = dict(
        name="tiny",
        model=ht.make_model,
        train_batches=ht.target_batches,
        loss=ht.mse,
        evaluate=ht.evaluate,
        source=str(source),
        source_evaluate=ht.evaluate_source,
        source_batches=ht.source_batches,
        validate=ht.validate,
    )
    return Task(**{**parts, **changes})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return ht.make_source(tmp_path_factory.mktemp("src") / "source.pt")


def test_a_trial_evaluates_on_source_data_logs_g2_over_v_and_applies_the_knobs(source):
    config = TrialConfig("reset-v", 0, 1e-3, steps=4, eval_every=2, grad_clip=0.5, beta2=0.95, replay=0.5)
    result = run_trial(_task(source), source, config, threads=1)
    metrics = {name for _, name, _, _ in result.records}
    assert {"source_loss", "val_loss", "eval_loss"} <= metrics
    assert result.info["g2_over_v"] and all(v == math.inf for v in result.info["g2_over_v"].values())  # v reset
    reload = run_trial(_task(source), source, TrialConfig("reload", 0, 1e-3, steps=1), threads=1)
    assert all(0 < v < math.inf for v in reload.info["g2_over_v"].values())
    assert 0 < result.info["replayed_steps"] < 4
    assert result.info["optimizer_hyperparameters"][0]["betas"] == [0.9, 0.999] or result.info[
        "optimizer_hyperparameters"
    ][0]["betas"] == (0.9, 0.999)


def test_wsd_and_continue_schedules():
    wsd = TrialConfig("reload", 0, 1e-3, steps=10, schedule="wsd")
    assert [lr_factor(s, wsd) for s in (1, 8)] == [1.0, 1.0] and lr_factor(10, wsd) == pytest.approx(0.1)
    assert lr_factor(1, TrialConfig("reload", 0, 1e-3, warmup=5, steps=10, schedule="continue")) == 1.0


def test_the_trial_id_covers_threads_optimizer_hyperparameters_and_torch_version():
    config = TrialConfig("reload", 0, 1e-3)
    base = {"task_code": "a", "optimizer_hyperparameters": [{"eps": 1e-8}], "threads": 1, "torch_version": "2"}
    ids = {
        config.trial_id("t", "s", base),
        config.trial_id("t", "s", {**base, "threads": 2}),
        config.trial_id("t", "s", {**base, "optimizer_hyperparameters": [{"eps": 1e-6}]}),
        config.trial_id("t", "s", {**base, "torch_version": "3"}),
        config.trial_id("t", "s", {**base, "task_code": "b"}),
    }
    assert len(ids) == 5


def test_a_resume_with_another_thread_count_runs_new_trials_and_exports_keep_every_column(source, tmp_path):
    store = tmp_path / "r.sqlite"
    sweep = Sweep(strategies=["reload"], seeds=[0], steps=2, eval_every=2)
    first = run(Spec(_task(source), sweep, store=store, out=None, workers=1, threads=1, progress=False))
    again = run(Spec(_task(source), sweep, store=store, out=None, workers=1, threads=2, progress=False))
    assert (first.ran, again.ran, again.skipped) == (1, 1, 0)
    with ResultsStore(store) as opened:
        table = pd.read_csv(opened.export(tmp_path / "all.csv"))
    assert {"info", "status", "finished", "grad_clip", "beta2", "replay", "value"} <= set(table.columns)


def test_two_processes_on_one_store_never_claim_the_same_trial(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultsStore(path) as a, ResultsStore(path) as b:
        b.owner = f"{b.owner.rpartition(':')[0]}:{os.getppid()}"  # another live process on this host
        got_a = a.claim(["t1", "t2"])
        got_b = b.claim(["t1", "t2", "t3"])
        assert got_a == ["t1", "t2"] and got_b == ["t3"]
        a.release()
        assert b.claim(["t1"]) == ["t1"]
    with ResultsStore(path) as c:  # a claim of a process that is gone is taken over
        c.owner = f"{c.owner.rpartition(':')[0]}:999999999"
        assert c.claim(["t9"]) == ["t9"]
    with ResultsStore(path) as d:
        assert d.claim(["t9"]) == ["t9"]


def test_plain_progress_lines_for_a_log(capsys):
    with Progress(3, "demo trials", enabled="lines", interval=0.0) as p:
        for _ in range(3):
            p.update("reload seed 0")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("demo trials: 0/3 trials") and err[-1].startswith("demo trials: 3/3 trials (100%)")


def test_tuning_selects_on_validation_and_reports_the_test_split(source, tmp_path):
    sweep = Sweep(strategies=["reload", "fresh"], seeds=[0, 1], lr=[1e-4, 3e-3], steps=4, eval_every=2)
    result = run(
        Spec(_task(source), sweep, store=tmp_path / "r.sqlite", out=None, workers=1, progress=False, tune=True)
    )
    table = result.summary.strategies
    assert "lr" in table and len(table) == 2
    trials = result.summary.trials
    for _, row in table.iterrows():
        mine = trials[trials["strategy"] == row["strategy"]]
        assert set(mine["lr"]) == {row["lr"]}
    with pytest.raises(Exception, match="validation split"):
        run(
            Spec(
                _task(source, validate=None),
                sweep,
                store=tmp_path / "r2.sqlite",
                out=None,
                workers=1,
                progress=False,
                tune=True,
            )
        )


@pytest.mark.slow
def test_the_ray_executor_ships_a_task_module_the_workers_cannot_import(source, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import importlib
    import sys

    folder = tmp_path / "userdir"
    folder.mkdir()
    (folder / "my_referee_task.py").write_text(
        "from tests.helpers.harness_tasks import *\ndef my_loss(model, batch):\n    return mse(model, batch)\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("my_referee_task")
    task = _task(source, loss=module.my_loss)
    result = run(
        Spec(
            task,
            Sweep(strategies=["reload"], seeds=[0], steps=2, eval_every=2),
            store=tmp_path / "r.sqlite",
            out=None,
            executor="ray",
            workers=1,
            progress=False,
        )
    )
    assert result.ran == 1 and not result.failed, result.failed
    assert list(result.summary.strategies["strategy"]) == ["reload"]  # stored under this process's id
    sys.modules.pop("my_referee_task", None)


def test_the_continue_schedule_keeps_the_sources_learning_rate_per_group(source):
    result = run_trial(_task(source), source, TrialConfig("reload", 0, 1e-3, steps=2, schedule="continue"), threads=1)
    lrs = {(step, g): v for step, name, g, v in result.records if name == "lr"}
    assert lrs == {(1, 0): 1e-2, (1, 1): 1e-2, (2, 0): 1e-2, (2, 1): 1e-2}  # the source's AdamW ran at 1e-2
