"""The fine-tuning harness end to end: trials, the results store, resume, executors, summaries."""

from __future__ import annotations

import copy
import json
import math
import sqlite3
import statistics

import pandas as pd
import pytest
import torch

import ostate
from ostate.errors import OstateError
from ostate.harness import ResultsStore, Spec, Sweep, Task, TrialConfig, builtin_task, run, run_trial, summarize_trials
from ostate.harness.metrics import ALL
from ostate.harness.source import load_source
from ostate.harness.summary import CELL
from ostate.reset.strategies import V_AGE_KEY
from tests.helpers import harness_tasks as ht


def tiny_task(source, **changes) -> Task:
    parts = dict(
        name="tiny",
        model=ht.make_model,
        train_batches=ht.target_batches,
        loss=ht.mse,
        evaluate=ht.evaluate,
        source=str(source),
    )
    return Task(**{**parts, **changes})


@pytest.fixture(scope="module")
def adamw_source(tmp_path_factory):
    return ht.make_source(tmp_path_factory.mktemp("src") / "source.pt")


def records_of(result, metric, group=ALL):
    return {step: value for step, name, g, value in result.records if name == metric and g == group}


def test_a_trial_records_losses_sizes_and_effective_lrs_per_group(adamw_source):
    result = run_trial(tiny_task(adamw_source), adamw_source, TrialConfig("reload", 0, 1e-3, steps=6, eval_every=3))
    assert sorted(records_of(result, "eval_loss")) == [0, 3, 6]
    assert sorted(records_of(result, "train_loss")) == [1, 2, 3, 4, 5, 6]
    assert sorted(records_of(result, "eval_scale")) == [0, 3, 6]  # a task's other eval metrics are kept
    groups = {g for _, name, g, _ in result.records if name == "update_rms"}
    assert groups == {0, 1, ALL}  # AdamW source: decay and no-decay groups
    assert set(records_of(result, "eff_lr_p50", 0)) == {3, 6}
    assert result.info["carried"] == 4 and result.info["actions"] == {"reload": 4}


def test_the_median_effective_lr_is_ostates_own_analysis_of_the_trials_optimizer(adamw_source):
    source = load_source(adamw_source)
    expected = ostate.analyze(ostate.from_state_dict(source.optimizer_state), by="group")["eff_lr_p50"]
    # With lr=... set back to the source's and no step, the trial would see the same table; after
    # one step at lr=1e-9 the weights barely move and the median is the source's rescaled by lr.
    result = run_trial(
        tiny_task(adamw_source),
        adamw_source,
        TrialConfig("reload", 0, 1e-9, steps=1, eval_every=1, schedule="constant"),
    )
    saved_lr = source.optimizer_state["param_groups"][0]["lr"]
    measured = records_of(result, "eff_lr_p50", 0)[1]
    assert measured == pytest.approx(expected[0] * 1e-9 / saved_lr, rel=0.15)


def test_same_seed_same_numbers_and_another_seed_other_numbers(adamw_source):
    config = TrialConfig("keep-v", 3, 1e-3, steps=5, eval_every=5)
    a = run_trial(tiny_task(adamw_source), adamw_source, config, threads=1)
    b = run_trial(tiny_task(adamw_source), adamw_source, config, threads=1)
    c = run_trial(
        tiny_task(adamw_source), adamw_source, TrialConfig("keep-v", 4, 1e-3, steps=5, eval_every=5), threads=1
    )
    assert a.records == b.records
    assert records_of(a, "train_loss") != records_of(c, "train_loss")
    assert a.trial_id == b.trial_id != c.trial_id


def test_reset_v_makes_the_first_update_far_larger_than_reload(adamw_source):
    """With v = 0 and the step kept, v_hat = (1 - beta2) g^2 / (1 - beta2^t): about 1/sqrt(1 - beta2) times
    too small a denominator, so the first update is tens of times larger."""
    first = {}
    for strategy in ("reload", "reset-v"):
        result = run_trial(tiny_task(adamw_source), adamw_source, TrialConfig(strategy, 0, 1e-3, steps=1))
        first[strategy] = records_of(result, "update_rms")[1]
    assert first["reset-v"] > 10 * first["reload"]


def test_keep_v_records_the_age_of_v_and_the_new_head_starts_fresh_in_its_own_group(tmp_path):
    source = ht.make_source(tmp_path / "s.pt")
    task = tiny_task(source, model=ht.wide_model, loss=ht.wide_loss, evaluate=ht.wide_evaluate)
    result = run_trial(task, source, TrialConfig("keep-v", 0, 1e-3, steps=2, eval_every=2))
    assert result.info["new_weights"] == ["2.weight", "2.bias"]
    assert set(result.info["started_fresh"]) == {"2.weight", "2.bias"}
    from ostate.harness.transfer import optimizer_like_source

    opt = optimizer_like_source(load_source(source))(ht.wide_model(), 1e-3)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 2]  # decay, no-decay, new head
    assert V_AGE_KEY not in opt.param_groups[2]


def test_a_source_of_another_optimizer_kind_is_refused_before_any_trial(tmp_path):
    source = ht.make_source(tmp_path / "sgd.pt", optimizer="sgd")
    task = tiny_task(source, optimizer=lambda model, lr: torch.optim.AdamW(model.parameters(), lr=lr))
    with pytest.raises(OstateError, match="source's optimizer state is sgd but the fine-tuning optimizer is adamw"):
        run(
            Spec(
                task,
                Sweep(strategies=["reload"], seeds=[0], steps=1),
                store=tmp_path / "r.sqlite",
                out=None,
                workers=1,
                progress=False,
            )
        )


class MyAdamW(torch.optim.AdamW):
    """A user's subclass: its state is AdamW's, whatever its class is called."""


@pytest.mark.parametrize("strategy", ["reset-v", "reset-m", "keep-v"])
def test_a_subclass_of_the_sources_optimizer_runs_a_trial_exactly_like_the_optimizer_itself(adamw_source, strategy):
    config = TrialConfig(strategy, 0, 1e-3, steps=2, eval_every=2)
    plain, sub = (
        run_trial(
            tiny_task(adamw_source, optimizer=lambda model, lr, cls=cls: cls(model.named_parameters(), lr=lr)),
            adamw_source,
            config,
            threads=1,
        )
        for cls in (torch.optim.AdamW, MyAdamW)
    )
    assert sub.info["optimizer"] == plain.info["optimizer"] == "adamw"
    assert sub.info["actions"] == plain.info["actions"] == {strategy: 4}
    assert sub.records == plain.records


def test_a_strategy_that_does_not_apply_stops_the_ablation_with_one_clear_error(tmp_path):
    source = ht.make_source(tmp_path / "sgd.pt", optimizer="sgd")
    with pytest.raises(OstateError, match="strategy 'reset-v'.*has no second moment"):
        run(
            Spec(
                tiny_task(source),
                Sweep(strategies=["reload", "reset-v"], seeds=[0], steps=1),
                store=tmp_path / "r.sqlite",
                out=None,
                workers=1,
                progress=False,
            )
        )
    assert not (tmp_path / "r.sqlite").exists() or ResultsStore(tmp_path / "r.sqlite").done_ids() == set()


def test_nadam_sources_carry_mu_product_and_reset_step_restarts_it(tmp_path):
    source = ht.make_source(tmp_path / "nadam.pt", optimizer="nadam")
    task = tiny_task(source, optimizer=lambda model, lr: torch.optim.NAdam(model.named_parameters(), lr=lr))
    result = run_trial(task, source, TrialConfig("reset-step", 0, 1e-3, steps=2, eval_every=2))
    assert result.info["optimizer"] == "nadam" and result.info["actions"] == {"reset-step": 4}


def test_a_source_whose_parameters_cannot_be_named_is_refused(tmp_path):
    source = ht.make_source(tmp_path / "bare.pt", named=False)
    with pytest.raises(OstateError, match="cannot name 4 of the optimizer's 4 parameters"):
        load_source(source)


def test_resume_skips_finished_trials_and_runs_only_new_ones(adamw_source, tmp_path):
    store = tmp_path / "r.sqlite"
    spec = Spec(
        tiny_task(adamw_source),
        Sweep(strategies=["reload", "fresh"], seeds=[0, 1], steps=3, eval_every=3),
        store=store,
        out=None,
        workers=1,
        progress=False,
    )
    first = run(spec)
    assert (first.ran, first.skipped) == (4, 0)
    before = ResultsStore(store).table()
    spec.sweep.strategies = ["reload", "fresh", "reset-m"]
    second = run(spec)
    assert (second.ran, second.skipped) == (2, 4)
    after = ResultsStore(store).table()
    pd.testing.assert_frame_equal(after[after["strategy"] != "reset-m"].reset_index(drop=True), before)
    assert list(second.summary.strategies["strategy"]) == ["reload", "fresh", "reset-m"]


def test_an_interrupted_run_keeps_every_finished_trial_and_a_rerun_continues(adamw_source, tmp_path):
    calls = {"n": 0}

    def evaluate_then_interrupt(model):
        calls["n"] += 1
        if calls["n"] == 5:  # two evals per trial: the third trial is interrupted mid-way (once)
            raise KeyboardInterrupt
        return ht.evaluate(model)

    store = tmp_path / "r.sqlite"
    sweep = Sweep(strategies=["reload", "fresh", "reset-m"], seeds=[0], steps=2, eval_every=2)
    with pytest.raises(KeyboardInterrupt):
        run(
            Spec(
                tiny_task(adamw_source, evaluate=evaluate_then_interrupt),
                sweep,
                store=store,
                out=None,
                workers=1,
                progress=False,
            )
        )
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT strategy, status FROM trials ORDER BY rowid").fetchall() == [
            ("reload", "done"),
            ("fresh", "done"),
        ]
        finished = {row[0] for row in db.execute("SELECT trial_id FROM trials")}
        assert {row[0] for row in db.execute("SELECT DISTINCT trial_id FROM records")} == finished
    # the same task (its code is part of the trial ids)
    task = tiny_task(adamw_source, evaluate=evaluate_then_interrupt)
    again = run(Spec(task, sweep, store=store, out=None, workers=1, progress=False))
    assert (again.ran, again.skipped) == (1, 2)


def test_a_failed_trial_is_recorded_and_retried_on_the_next_run(adamw_source, tmp_path):
    store = tmp_path / "r.sqlite"
    spec = Spec(
        tiny_task(adamw_source, train_batches=ht.failing_batches),
        Sweep(strategies=["reload"], seeds=[0, 1], steps=2, eval_every=2),
        store=store,
        out=None,
        workers=1,
        progress=False,
    )
    result = run(spec)
    assert result.ran == 1 and len(result.failed) == 1 and "data for seed 1 is unavailable" in result.failed[0][1]
    trials = ResultsStore(store).trials(status="failed")
    assert list(trials["seed"]) == [1] and "unavailable" in json.loads(trials["info"][0])["error"]
    spec.task = tiny_task(adamw_source)
    assert run(spec).ran == 1  # only the failed trial runs again


@pytest.mark.slow
def test_a_small_ablation_of_a_builtin_task_end_to_end_on_the_process_pool(tmp_path):
    task = builtin_task("sans-to-serif", pretrain_steps=20, progress=False)
    spec = Spec(
        task,
        Sweep(
            strategies=["fresh", "reload", "reset-v", "keep-v"], seeds=[0, 1], steps=4, eval_every=2, batch_size=[16]
        ),
        store=tmp_path / "out" / "results.sqlite",
        out=tmp_path / "out",
        workers=2,
        threads=1,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    result = run(spec)
    assert (result.ran, result.skipped, result.failed) == (8, 0, [])
    table = result.summary.strategies
    assert list(table["strategy"]) == ["reload", "fresh", "reset-v", "keep-v"]
    assert (table["n"] == 2).all() and table["final_mean"].notna().all() and "final_accuracy_mean" in table
    paired = result.summary.paired
    assert set(paired["strategy"]) == {"fresh", "reset-v", "keep-v"} and (paired["pairs"] == 2).all()
    names = sorted(p.rsplit("/", 1)[-1] for p in result.files)
    assert names == [
        "eval_loss.png",
        "final_loss.png",
        "paired.csv",
        "pareto.png",
        "strategies.csv",
        "trials.csv",
        "update_rms.png",
    ]
    for path in result.files:
        if path.endswith(".png"):
            assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # Every trial starts from the same source model: the same eval loss before the first step.
    records = ResultsStore(spec.store).records(["eval_loss"])
    assert records[records["step"] == 0]["value"].nunique() == 1
    # The pool gives the numbers one process gives (same threads per trial).
    config = TrialConfig("keep-v", 1, 1e-3, warmup=0, batch_size=16, steps=4, eval_every=2)
    alone = run_trial(task, result.source, config, threads=1)
    stored = ResultsStore(spec.store).records()
    stored = stored[stored["trial_id"] == alone.trial_id]
    assert sorted(map(tuple, stored[["step", "metric", "grp", "value"]].itertuples(index=False, name=None))) == sorted(
        alone.records
    )


@pytest.mark.slow
def test_the_ray_executor_in_local_mode_gives_the_same_numbers_as_the_local_pool(adamw_source, tmp_path):
    pytest.importorskip("ray")
    sweep = Sweep(strategies=["reload", "keep-v"], seeds=[0, 1], steps=3, eval_every=3)
    local = run(
        Spec(
            tiny_task(adamw_source),
            copy.deepcopy(sweep),
            store=tmp_path / "local.sqlite",
            out=None,
            workers=2,
            threads=1,
            progress=False,
        )
    )
    ray = run(
        Spec(
            tiny_task(adamw_source),
            copy.deepcopy(sweep),
            store=tmp_path / "ray.sqlite",
            out=None,
            executor="ray",
            workers=2,
            progress=False,
        )
    )
    assert (local.ran, ray.ran) == (4, 4)
    # every column but when it finished and the trial's info (wall time)
    a, b = (
        ResultsStore(r.store)
        .table()
        .drop(columns=["info", "finished"])
        .sort_values(["trial_id", "step", "metric", "grp"])
        .reset_index(drop=True)
        for r in (local, ray)
    )
    pd.testing.assert_frame_equal(a, b)


def test_a_task_of_lambdas_on_the_process_pool_is_refused_with_what_to_do(adamw_source, tmp_path):
    task = tiny_task(adamw_source, evaluate=lambda model: 0.0)
    with pytest.raises(OstateError, match="cannot be sent to worker processes.*module level"):
        run(
            Spec(
                task,
                Sweep(strategies=["reload"], seeds=[0, 1], steps=1),
                store=tmp_path / "r.sqlite",
                out=None,
                workers=2,
                progress=False,
            )
        )


def test_export_writes_every_record_with_its_settings_as_csv_and_parquet(adamw_source, tmp_path):
    spec = Spec(
        tiny_task(adamw_source),
        Sweep(strategies=["reload"], seeds=[0], steps=2, eval_every=2),
        store=tmp_path / "r.sqlite",
        out=None,
        workers=1,
        progress=False,
    )
    run(spec)
    store = ResultsStore(spec.store)
    csv = pd.read_csv(store.export(tmp_path / "all.csv"))
    parquet = pd.read_parquet(store.export(tmp_path / "all.parquet"))
    assert {"trial_id", "task", "strategy", "seed", "lr", "step", "metric", "grp", "value"} <= set(csv.columns)
    assert len(csv) == len(parquet) == len(store.records()) > 0
    with pytest.raises(OstateError, match=r"\.csv or \.parquet"):
        store.export(tmp_path / "all.json")


def _synthetic(curves: dict[tuple[str, int], list[float]], steps=(0, 10, 20)):
    """Trials and records tables for given eval-loss curves per (strategy, seed)."""
    trials, records = [], []
    for i, ((strategy, seed), losses) in enumerate(curves.items()):
        tid = f"t{i}"
        trials.append(
            dict(
                trial_id=tid,
                strategy=strategy,
                seed=seed,
                lr=1e-3,
                warmup=0,
                batch_size=32,
                schedule="cosine",
                steps=steps[-1],
            )
        )
        for step, loss in zip(steps, losses):
            records.append(dict(trial_id=tid, step=step, metric="eval_loss", grp=ALL, value=loss))
        records.append(
            dict(trial_id=tid, step=1, metric="train_loss", grp=ALL, value=math.inf if math.isnan(losses[-1]) else 1.0)
        )
    return pd.DataFrame(trials), pd.DataFrame(records)


def test_summary_statistics_follow_their_definitions():
    trials, records = _synthetic(
        {
            ("reload", 0): [4.0, 2.0, 1.0],
            ("reload", 1): [4.0, 2.0, 1.3],
            ("reload", 2): [4.0, 2.0, 1.1],
            ("fresh", 0): [4.0, 3.0, 1.2],
            ("fresh", 1): [4.0, 3.0, 1.5],
            ("fresh", 2): [4.0, 1.0, 1.3],
        }
    )
    s = summarize_trials(trials, records)
    reload, fresh = (s.strategies.set_index("strategy").loc[k] for k in ("reload", "fresh"))
    std = statistics.stdev([1.0, 1.3, 1.1])
    assert reload["final_mean"] == pytest.approx(3.4 / 3) and reload["final_std"] == pytest.approx(std)
    # 95% t interval with 2 degrees of freedom: t = 4.302653 (tables).
    assert reload["final_hi"] - reload["final_mean"] == pytest.approx(4.302653 * std / math.sqrt(3), rel=1e-6)
    # AUC / N by the trapezoid rule: (4+2)/2*10 + (2+1)/2*10 = 45 -> 2.25 for seed 0.
    assert s.trials.set_index(["strategy", "seed"]).loc[("reload", 0), "auc"] == pytest.approx(2.25)
    # The target is reload's mean final loss, 1.133: reached at step 20 by reload seeds 0 and 2, and at
    # step 10 by fresh seed 2; the others are censored at step 20 (Kaplan-Meier: reload's median is 20,
    # fresh's undefined: fewer than half reached it).
    assert reload["target"] == pytest.approx(3.4 / 3) and reload["reached"] == 2 and fresh["reached"] == 1
    assert reload["to_target_median"] == 20 and math.isnan(fresh["to_target_median"])
    paired = s.paired.set_index(["strategy", "quantity"]).loc[("fresh", "final")]
    assert paired["diff_mean"] == pytest.approx(0.2) and paired["pairs"] == 3
    assert paired["p_wilcoxon"] == pytest.approx(0.25)  # 3 positive differences: 2 of 8 sign patterns as extreme


def test_diverged_trials_are_counted_and_left_out_of_the_means():
    trials, records = _synthetic(
        {
            ("reload", 0): [4.0, 2.0, 1.0],
            ("reload", 1): [4.0, 2.0, 1.2],
            ("reset-v", 0): [4.0, 9.0, math.nan],
            ("reset-v", 1): [4.0, 2.0, 1.4],
        }
    )
    row = summarize_trials(trials, records).strategies.set_index("strategy").loc["reset-v"]
    assert row["failed"] == 1 and row["final_mean"] == pytest.approx(1.4)


def test_cells_are_summarised_apart():
    trials, records = _synthetic({("reload", 0): [2.0, 1.0, 0.5], ("fresh", 0): [2.0, 1.5, 1.0]})
    more_t, more_r = _synthetic({("reload", 0): [2.0, 1.0, 0.7]})
    more_t["trial_id"], more_r["trial_id"], more_t["lr"] = "x", "x", 3e-3
    s = summarize_trials(pd.concat([trials, more_t]), pd.concat([records, more_r]))
    assert sorted(s.strategies["lr"].unique()) == [1e-3, 3e-3]
    assert len(s.strategies.groupby(list(CELL))) == 2
