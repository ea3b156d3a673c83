"""The strategies on Prodigy (prodigyopt) and D-Adaptation (dadaptation's Adam, SGD, AdaGrad, Lion and
Adan): the learned step size d.

Both keep their estimate d (which multiplies lr) and the sums it is learned from in the
param groups. The oracle is the real library: ``reload`` must continue exactly as the
saved optimizer loaded into a new one of the library continues, ``fresh`` must take a
new optimizer's first step, in a harness trial and in what ``ostate reset`` writes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ostate.errors import OstateError
from ostate.harness import Task, TrialConfig, run_trial
from ostate.harness.source import load_source
from ostate.harness.transfer import optimizer_like_source, transfer_state
from ostate.reset.strategies import apply_strategy
from tests.helpers import harness_tasks as ht
from tests.helpers.common import run_cli

prodigyopt = pytest.importorskip("prodigyopt")
dadaptation = pytest.importorskip("dadaptation")

MAKERS = {
    "prodigy": lambda ps, **kw: prodigyopt.Prodigy(ps, lr=1.0, **kw),
    "prodigy-bias-correction": lambda ps, **kw: prodigyopt.Prodigy(
        ps, lr=1.0, use_bias_correction=True, weight_decay=0.01, **kw
    ),
    "dadapt_adam": lambda ps, **kw: dadaptation.DAdaptAdam(ps, lr=1.0, **kw),
    "dadapt_sgd": lambda ps, **kw: dadaptation.DAdaptSGD(ps, lr=1.0, momentum=0.9, **kw),
    "dadapt_adagrad": lambda ps, **kw: dadaptation.DAdaptAdaGrad(ps, lr=1.0, **kw),
    "dadapt_lion": lambda ps, **kw: dadaptation.DAdaptLion(ps, lr=1.0, **kw),
    "dadapt_adan": lambda ps, **kw: dadaptation.DAdaptAdan(ps, lr=1.0, **kw),
}
LEARNED = {
    "prodigy": ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k"),
    "dadapt_adam": ("d", "numerator_weighted", "k"),
    "dadapt_sgd": ("d", "numerator_weighted", "k", "g0_norm"),
    "dadapt_adagrad": ("d", "gsq_weighted", "sksq_weighted", "skl1", "k"),
    "dadapt_lion": ("d", "numerator_weighted", "k"),
    "dadapt_adan": ("d", "gsq_weighted", "k"),
}
# The state keys each partial strategy zeroes (with d and its sums kept); the others are refused.
PARTIAL = {
    "prodigy": {"reset-m": ("exp_avg",), "reset-v": ("exp_avg_sq",)},
    "dadapt_adam": {"reset-m": ("exp_avg",), "reset-v": ("exp_avg_sq",)},
    "dadapt_lion": {"reset-m": ("exp_avg",)},
    "dadapt_adan": {"reset-m": ("exp_avg", "exp_avg_diff"), "reset-v": ("exp_avg_sq",)},
    "dadapt_sgd": {},
    "dadapt_adagrad": {},
}
_COUNTER_K = {"reset-step": "counter k", "keep-v": "counter k"}
_DUAL_AVERAGING = dict.fromkeys(
    ["reset-m", "reset-v", "reset-step", "keep-v", "reset-m-ac", "reset-v-ac"], "sends the weights back to x0"
)
# Why a refused strategy does not apply, by family (absent: only "does not apply" is checked).
REASONS = {
    "prodigy": _COUNTER_K,
    "dadapt_adam": _COUNTER_K,
    "dadapt_lion": {"reset-v": "no second moment", "keep-v": "no second moment", "reset-step": "no step counter"},
    "dadapt_adan": {"reset-step": "no bias correction", "keep-v": "no bias correction"},
    "dadapt_sgd": _DUAL_AVERAGING,
    "dadapt_adagrad": _DUAL_AVERAGING,
}
# Families whose fresh state is no entry: a key of it is the weights at the first step (p0, x0, z).
FRESH_IS_NO_ENTRY = {"prodigy", "dadapt_sgd", "dadapt_adagrad"}
SEED = 3


def family(case: str) -> str:
    return case.split("-")[0]


def make_source(path, case: str, steps: int = 20) -> str:
    """The harness's tiny model trained on the source map by the real library; {'model', 'optimizer'} saved."""
    torch.manual_seed(0)
    model = ht.make_model()
    opt = MAKERS[case](model.parameters())
    stream = ht.batches(ht.W_SOURCE, 32, torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        ht.mse(model, next(stream)).backward()
        opt.step()
    assert opt.param_groups[0]["d"] > 10 * 1e-6  # d has grown from d0 by an order of magnitude or more
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return str(path)


def weights(model: torch.nn.Module) -> dict[str, float]:
    """Every weight as an eval metric (float32 to float64 is exact), so a trial's weights can be compared."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    return {"loss": 0.0, **{f"w{i}": v for i, v in enumerate(flat)}}


def trial_weights(source: str, strategy: str, optimizer=None) -> torch.Tensor:
    task = Task("tiny", ht.make_model, ht.target_batches, ht.mse, weights, source=source, optimizer=optimizer)
    result = run_trial(task, source, TrialConfig(strategy, SEED, 1.0, steps=1, schedule="constant"), threads=1)
    after = {name: value for step, name, _, value in result.records if step == 1 and name.startswith("eval_w")}
    return torch.tensor([after[f"eval_w{i}"] for i in range(len(after))], dtype=torch.float32)


def library_step(source: str, case: str, optimizer_state: dict | None, **options) -> torch.Tensor:
    """The source's weights stepped once on the trial's first batch by a new optimizer of the library,
    loaded with ``optimizer_state`` (None: a new optimizer's first step)."""
    saved = torch.load(source, weights_only=True)
    model = ht.make_model()
    model.load_state_dict(saved["model"])
    opt = MAKERS[case](model.parameters(), **options)
    if optimizer_state is not None:
        opt.load_state_dict(copy.deepcopy(optimizer_state))
    batch = next(ht.target_batches(32, torch.Generator().manual_seed(SEED)))
    opt.zero_grad()
    ht.mse(model, batch).backward()
    opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def moved(path: str, after: torch.Tensor) -> torch.Tensor:
    """The change from the source's weights (a step, whose size d sets)."""
    saved = torch.load(path, weights_only=True)["model"]
    return after.double() - torch.cat([w.flatten() for w in saved.values()]).double()


@pytest.fixture(scope="module", params=sorted(MAKERS))
def source(request, tmp_path_factory):
    return request.param, make_source(tmp_path_factory.mktemp("src") / "source.pt", request.param)


def test_reload_in_a_trial_continues_the_real_optimizer_with_its_learned_d(source):
    case, path = source
    saved = torch.load(path, weights_only=True)["optimizer"]
    expected = library_step(path, case, saved)
    assert torch.equal(trial_weights(path, "reload"), expected)
    # the same with the user's own optimizer factory (a new optimizer of the library: d0 in its groups)
    own = trial_weights(path, "reload", optimizer=lambda model, lr: MAKERS[case](model.parameters()))
    assert torch.equal(own, expected)
    # without the saved d (a new optimizer's groups, the saved moments) the step would be another
    groups_reset = {**saved, "param_groups": [{**g, "d": 1e-6} for g in saved["param_groups"]]}
    assert not torch.allclose(moved(path, library_step(path, case, groups_reset)), moved(path, expected), rtol=1e-3)


def test_fresh_in_a_trial_is_a_new_optimizers_first_step(source):
    case, path = source
    assert torch.equal(trial_weights(path, "fresh"), library_step(path, case, None))


def test_fresh_in_a_trial_starts_at_the_d0_of_the_users_own_optimizer(source):
    """DAdaptAdam's groups do not record d0: the trial's new optimizer's own d is the fresh one."""
    case, path = source
    own = trial_weights(path, "fresh", optimizer=lambda model, lr: MAKERS[case](model.parameters(), d0=1e-4))
    assert torch.equal(own, library_step(path, case, None, d0=1e-4))
    assert not torch.allclose(moved(path, own), moved(path, library_step(path, case, None)), rtol=1e-3)


def test_the_trials_optimizer_gets_the_sources_learned_group_values_and_its_own_hyperparameters(source):
    case, path = source
    src = load_source(path)
    model = ht.make_model()
    opt = optimizer_like_source(src)(model, 0.5)
    assert opt.param_groups[0]["d"] == 1e-6 and opt.param_groups[0]["k"] == 0  # built new: d0, not the saved d
    moved = transfer_state(src, opt, model).state_dict["param_groups"][0]
    saved = src.optimizer_state["param_groups"][0]
    assert {k: moved[k] for k in LEARNED[family(case)]} == {k: saved[k] for k in LEARNED[family(case)]}
    assert moved["lr"] == 0.5  # the trial's hyperparameters win


@pytest.mark.parametrize("strategy", ["reload", "fresh"])
def test_ostate_reset_writes_what_the_real_library_resumes_as_the_strategy_says(source, strategy, tmp_path):
    case, path = source
    out = tmp_path / f"{strategy}.pt"
    result = run_cli("reset", path, "--strategy", strategy, "-o", str(out))
    assert result.returncode == 0, result.stderr
    written = torch.load(out, weights_only=True)["optimizer"]
    saved = torch.load(path, weights_only=True)["optimizer"]
    expected = library_step(path, case, saved if strategy == "reload" else None)
    assert torch.equal(library_step(path, case, written), expected)
    group = written["param_groups"][0]
    if strategy == "fresh":
        assert group["d"] == 1e-6 and group["k"] == 0
        # written out as a new optimizer's values (ostate reset's default), except Prodigy's: its p0 is the
        # weights at the first step, so its fresh state is no entry (the library then starts it itself);
        # so are D-Adaptation SGD's and AdaGrad's (x0, z)
        if family(case) in FRESH_IS_NO_ENTRY:
            assert written["state"] == {}
        else:
            assert all(not torch.as_tensor(v).any() for state in written["state"].values() for v in state.values())
    else:
        assert all(group[k] == saved["param_groups"][0][k] for k in LEARNED[family(case)])


@pytest.mark.parametrize("strategy", ["reset-m", "reset-v", "reset-step", "keep-v", "reset-m-ac", "reset-v-ac"])
def test_a_partial_strategy_zeroes_its_moments_keeping_d_or_is_refused_with_the_reason(source, strategy):
    """Where the strategy applies (PARTIAL), it zeroes its moments and keeps d with everything d is
    learned from: the real library steps the result as it steps the state zeroed by hand. Where it
    does not, it is refused, with the family's reason (REASONS)."""
    case, path = source
    saved = torch.load(path, weights_only=True)["optimizer"]
    keys = PARTIAL[family(case)].get(strategy)
    if keys is not None:
        new = apply_strategy(saved, strategy)
        assert new["param_groups"] == saved["param_groups"]
        by_hand = copy.deepcopy(saved)
        for state in by_hand["state"].values():
            for key in keys:
                state[key] = torch.zeros_like(state[key])
        assert torch.equal(library_step(path, case, new), library_step(path, case, by_hand))
        return
    with pytest.raises(OstateError, match="does not apply") as error:
        apply_strategy(saved, strategy)
    reason = REASONS[family(case)].get(strategy)
    if reason is not None:
        assert reason in str(error.value)
    if reason == "counter k":
        assert "learned with the estimate d" in str(error.value)


def test_a_regex_strategy_that_keeps_some_state_keeps_d_and_a_new_head_starts_at_it(source):
    case, path = source
    saved = torch.load(path, weights_only=True)["optimizer"]
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    new = apply_strategy(saved, r"reload:^0\.", names=names)
    assert new["param_groups"] == saved["param_groups"] and sorted(new["state"]) == [0, 1]
    fresh = apply_strategy(saved, "fresh")["param_groups"][0]
    assert fresh["d"] == 1e-6 and "d_hat" not in fresh and "d_denom" not in fresh and "g0_norm" not in fresh


def test_a_prodigy_source_cannot_seed_a_dadaptation_trial(tmp_path):
    path = make_source(tmp_path / "p.pt", "prodigy")
    task = Task(
        "tiny",
        ht.make_model,
        ht.target_batches,
        ht.mse,
        ht.evaluate,
        source=path,
        optimizer=lambda model, lr: dadaptation.DAdaptAdam(model.parameters(), lr=lr),
    )
    with pytest.raises(OstateError, match="prodigy but the fine-tuning optimizer is dadapt_adam"):
        run_trial(task, path, TrialConfig("reload", 0, 1.0, steps=1))


@pytest.mark.parametrize("case", sorted(MAKERS))
def test_a_live_fresh_restarts_at_the_d0_the_optimizer_was_built_with(case):
    """The StrategyCallbacks' core: DAdaptAdam's groups do not record d0, the live optimizer's defaults do."""
    from ostate.integrations.live import apply_to_optimizer

    torch.manual_seed(0)
    model = ht.make_model()
    opt = MAKERS[case](model.parameters(), d0=1e-4)
    stream = ht.batches(ht.W_SOURCE, 32, torch.Generator().manual_seed(0))
    for _ in range(5):
        opt.zero_grad()
        ht.mse(model, next(stream)).backward()
        opt.step()
    assert opt.param_groups[0]["d"] > 1e-4
    apply_to_optimizer(opt, model, "fresh")
    assert opt.param_groups[0]["d"] == 1e-4 and opt.param_groups[0]["k"] == 0
    twin = copy.deepcopy(model)
    new = MAKERS[case](twin.parameters(), d0=1e-4)
    batch = next(stream)
    for m, o in ((model, opt), (twin, new)):
        o.zero_grad()
        ht.mse(m, batch).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
