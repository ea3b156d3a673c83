"""Strategies on real torch optimizer state: which keys change, and what the next steps do.

torch is the oracle: a strategy's result is loaded into the real optimizer and stepped.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ostate.errors import OstateError
from ostate.optimizers import families
from ostate.reset.strategies import (
    AGE_OFFSETS_KEY,
    ALL_STRATEGIES,
    STRATEGIES,
    V_AGE_KEY,
    Strategy,
    apply_strategy,
    attach,
    optimizer_kind,
    plan,
    v_age_factor,
)

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, dampening=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, lr_decay=1e-3, initial_accumulator_value=0.1),
    "adadelta": lambda p: torch.optim.Adadelta(p),
}


def model_and_optimizer(name: str, steps: int = 20, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    opt = OPTIMIZERS[name](model.parameters())
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g).to(dtype)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


def fixed_grads(model: nn.Module, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in model.parameters()]


def step_with(model: nn.Module, opt: torch.optim.Optimizer, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Step with given gradients; returns the change of every parameter."""
    before = [p.detach().clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def kind_of(name: str) -> str:
    return "adam" if name == "amsgrad" else name


def applicable(name: str) -> list[str]:
    """The strategies that apply to each configured optimizer (the others must be refused)."""
    return {
        "adam": list(ALL_STRATEGIES),
        "adamw": list(ALL_STRATEGIES),
        "amsgrad": list(ALL_STRATEGIES),
        "nadam": list(ALL_STRATEGIES),
        "radam": list(ALL_STRATEGIES),
        "adamax": list(STRATEGIES),
        "sgd": ["fresh", "reload", "reset-m"],
        "rmsprop": ["fresh", "reload", "reset-m", "reset-v", "keep-v"],
        "adagrad": ["fresh", "reload", "reset-v", "reset-step"],
        "adadelta": ["fresh", "reload", "reset-v"],
    }[name]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_every_strategy_loads_into_the_real_optimizer_or_is_refused_with_a_reason(name, strategy):
    model, opt = model_and_optimizer(name)
    saved = opt.state_dict()
    before = copy.deepcopy(saved)
    if strategy not in applicable(name):
        with pytest.raises(OstateError, match="does not apply"):
            apply_strategy(saved, strategy, kind=optimizer_kind(opt))
        return
    new = apply_strategy(saved, strategy, kind=optimizer_kind(opt))
    # The input is never modified.
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(saved["state"][index][key]), torch.as_tensor(value))
    opt.load_state_dict(new)
    detach = attach(opt)
    delta = step_with(model, opt, fixed_grads(model, 1))
    detach()
    assert all(torch.isfinite(d).all() for d in delta)
    assert any(d.abs().sum() > 0 for d in delta)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fresh_steps_exactly_like_a_new_optimizer(name):
    model, opt = model_and_optimizer(name)
    twin = copy.deepcopy(model)
    new_opt = OPTIMIZERS[name](twin.parameters())
    opt.load_state_dict(apply_strategy(opt.state_dict(), "fresh", kind=optimizer_kind(opt)))
    grads = fixed_grads(model, 2)
    for _ in range(3):
        a, b = step_with(model, opt, grads), step_with(twin, new_opt, grads)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_reload_steps_exactly_like_the_saved_optimizer(name):
    model, opt = model_and_optimizer(name)
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[name](twin.parameters())
    # Kept tensors are shared with the input, as torch's own load_state_dict shares them: copy
    # before stepping two optimizers from one state.
    twin_opt.load_state_dict(copy.deepcopy(apply_strategy(opt.state_dict(), "reload", kind=optimizer_kind(opt))))
    grads = fixed_grads(model, 3)
    a, b = step_with(model, opt, grads), step_with(twin, twin_opt, grads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "strategy, reset, kept",
    [
        ("reset-m", {"exp_avg"}, {"exp_avg_sq", "max_exp_avg_sq", "step"}),
        ("reset-v", {"exp_avg_sq", "max_exp_avg_sq"}, {"exp_avg", "step"}),
        ("reset-step", {"step"}, {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
        ("keep-v", {"exp_avg", "step"}, {"exp_avg_sq", "max_exp_avg_sq"}),
    ],
)
def test_partial_resets_of_amsgrad_zero_exactly_their_keys_and_share_the_rest(strategy, reset, kept):
    _, opt = model_and_optimizer("amsgrad")
    saved = opt.state_dict()
    new = apply_strategy(saved, strategy)
    for index, state in new["state"].items():
        assert set(state) == set(saved["state"][index])
        for key in reset:
            assert not torch.as_tensor(state[key]).any(), key
        for key in kept:
            assert state[key] is saved["state"][index][key], key  # shared, not copied


def test_nadam_reset_step_restarts_mu_product_with_step():
    _, opt = model_and_optimizer("nadam")
    assert float(opt.state_dict()["state"][0]["mu_product"]) < 0.5
    new = apply_strategy(opt.state_dict(), "reset-step", kind="nadam")
    assert float(new["state"][0]["step"]) == 0 and float(new["state"][0]["mu_product"]) == 1.0


def test_nadam_first_step_after_reset_step_matches_the_closed_form():
    model, opt = model_and_optimizer("nadam", dtype=torch.float64)
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(copy.deepcopy(apply_strategy(saved, "reset-step", kind="nadam")))
    grads = fixed_grads(model, 4)
    delta = step_with(model, opt, grads)
    group = opt.param_groups[0]
    (beta1, beta2), lr, eps, psi = group["betas"], group["lr"], group["eps"], group["momentum_decay"]
    mu1 = beta1 * (1 - 0.5 * 0.96 ** (1 * psi))
    mu2 = beta1 * (1 - 0.5 * 0.96 ** (2 * psi))
    for index, (g, d) in enumerate(zip(grads, delta)):
        m = saved["state"][index]["exp_avg"].lerp(g, 1 - beta1)
        v = saved["state"][index]["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
        denom = (v / (1 - beta2)).sqrt() + eps
        expected = -lr * (1 - mu1) / (1 - mu1) * g / denom - lr * mu2 / (1 - mu1 * mu2) * m / denom
        torch.testing.assert_close(d, expected, rtol=1e-9, atol=1e-12)


def test_sgd_reset_m_removes_the_buffer_so_the_first_step_uses_the_raw_gradient():
    model, opt = model_and_optimizer("sgd", dtype=torch.float64)
    new = apply_strategy(opt.state_dict(), "reset-m")
    assert all("momentum_buffer" not in s for s in new["state"].values())
    opt.load_state_dict(new)
    grads = fixed_grads(model, 5)
    delta = step_with(model, opt, grads)
    # torch's first SGD step sets buf = g (no dampening): the change is exactly -lr * g.
    for d, g in zip(delta, grads):
        torch.testing.assert_close(d, -1e-2 * g, rtol=1e-9, atol=1e-12)


def test_adagrad_fresh_starts_from_the_initial_accumulator_value():
    _, opt = model_and_optimizer("adagrad")
    new = apply_strategy(opt.state_dict(), "fresh", kind="adagrad")
    assert all(torch.all(s["sum"] == 0.1) and float(s["step"]) == 0 for s in new["state"].values())


@pytest.mark.parametrize("name", ["adam", "adamw", "amsgrad", "nadam"])
def test_keep_v_is_a_fresh_first_moment_over_a_second_moment_that_keeps_its_age(name):
    """The oracle: two real optimizers fed the same gradients, one fresh (F) and one reloaded (R).

    keep-v's update must be F's numerator over R's bias-corrected second moment:
    adam part of K = adam part of F * (sqrt(v_F / bc2(s)) + eps) / (sqrt(v_R / bc2(T + s)) + eps),
    with decoupled weight decay acting on K's own weights.
    """
    model, opt = model_and_optimizer(name, steps=30, dtype=torch.float64)
    saved = opt.state_dict()
    T = float(saved["state"][0]["step"])
    fresh_model, reload_model, keep_model = (copy.deepcopy(model) for _ in range(3))
    fresh, reloaded, kept = (OPTIMIZERS[name](m.parameters()) for m in (fresh_model, reload_model, keep_model))
    reloaded.load_state_dict(copy.deepcopy(saved))
    kept.load_state_dict(copy.deepcopy(apply_strategy(saved, "keep-v", kind=optimizer_kind(opt))))
    assert kept.param_groups[0][V_AGE_KEY] == T
    attach(kept)
    group = kept.param_groups[0]
    lr, eps, wd, beta2 = group["lr"], group["eps"], group["weight_decay"], group["betas"][1]
    decoupled = group.get("decoupled_weight_decay", False)
    second = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    for s in range(1, 6):
        grads = fixed_grads(model, 10 + s)
        theta_f = [p.detach().clone() for p in fresh_model.parameters()]
        theta_k = [p.detach().clone() for p in keep_model.parameters()]
        d_f = step_with(fresh_model, fresh, grads)
        step_with(reload_model, reloaded, grads)
        d_k = step_with(keep_model, kept, grads)
        for i, _p in enumerate(keep_model.parameters()):
            v_f = fresh.state[list(fresh_model.parameters())[i]][second]
            v_r = reloaded.state[list(reload_model.parameters())[i]][second]
            adam_f = d_f[i] + (lr * wd * theta_f[i] if decoupled else 0)
            ratio = ((v_f / (1 - beta2**s)).sqrt() + eps) / ((v_r / (1 - beta2 ** (T + s))).sqrt() + eps)
            expected = adam_f * ratio - (lr * wd * theta_k[i] if decoupled else 0)
            # NAdam: a fresh optimizer keeps mu_product in float32, a loaded one in the weights' dtype.
            rtol = 1e-6 if name == "nadam" else 1e-9
            torch.testing.assert_close(d_k[i], expected, rtol=rtol, atol=1e-13)
    # The hooks restore the hyperparameters after each step.
    assert group["lr"] == lr and group["eps"] == eps and group["weight_decay"] == wd


# L2 weight decay (added to the gradient): Adam's and NAdam's default form.
L2_DECAY = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(L2_DECAY))
def test_keep_v_leaves_l2_weight_decay_in_the_gradient_unscaled(name, monkeypatch):
    """With L2 decay the gradient is g + wd * theta, which enters m and v as it is: the first
    keep-v step is -lr * m_hat / (sqrt(v / (1 - beta2^(T+1))) + eps) of that gradient (Adam;
    NAdam scales m_hat by its momentum schedule, so only its direction is checked exactly)."""
    monkeypatch.setitem(OPTIMIZERS, name, L2_DECAY[name])
    model, opt = model_and_optimizer(name, steps=30, dtype=torch.float64)
    saved = opt.state_dict()
    T = float(saved["state"][0]["step"])
    kept = OPTIMIZERS[name](model.parameters())
    kept.load_state_dict(apply_strategy(copy.deepcopy(saved), "keep-v", kind=optimizer_kind(opt)))
    attach(kept)
    group = kept.param_groups[0]
    lr, eps, wd, (_, beta2) = group["lr"], group["eps"], group["weight_decay"], group["betas"]
    theta = [p.detach().clone() for p in model.parameters()]
    grads = fixed_grads(model, 11)
    delta = step_with(model, kept, grads)
    for i, (d, g) in enumerate(zip(delta, grads)):
        g2 = g + wd * theta[i]
        v = beta2 * saved["state"][i]["exp_avg_sq"] + (1 - beta2) * g2 * g2
        direction = g2 / ((v / (1 - beta2 ** (T + 1))).sqrt() + eps)  # m_hat_1 = g2 for Adam
        if name == "adam":
            torch.testing.assert_close(d, -lr * direction, rtol=1e-9, atol=1e-15)
        else:
            scale = d.flatten()[0] / direction.flatten()[0]
            torch.testing.assert_close(d, scale * direction, rtol=1e-9, atol=1e-15)
    assert group["weight_decay"] == wd


def test_keep_v_without_the_hook_would_make_the_first_step_far_too_small():
    model, opt = model_and_optimizer("adam", steps=200)
    saved = opt.state_dict()
    plain, hooked = copy.deepcopy(model), copy.deepcopy(model)
    plain_opt, hooked_opt = (
        torch.optim.Adam(plain.parameters(), lr=1e-2),
        torch.optim.Adam(hooked.parameters(), lr=1e-2),
    )
    new = apply_strategy(saved, "keep-v")
    plain_opt.load_state_dict(copy.deepcopy(new))
    hooked_opt.load_state_dict(copy.deepcopy(new))
    attach(hooked_opt)
    grads = fixed_grads(model, 6)
    small = torch.cat([d.flatten() for d in step_with(plain, plain_opt, grads)]).norm()
    right = torch.cat([d.flatten() for d in step_with(hooked, hooked_opt, grads)]).norm()
    # 1 / sqrt(1 - 0.999) = 31.6 at s = 1 once v is mature (v_age 200: sqrt(1 - 0.999**201) = 0.426).
    assert right / small == pytest.approx(v_age_factor(hooked_opt.param_groups[0], 1), rel=0.05)
    assert right / small > 10


def test_keep_v_of_part_of_a_group_records_per_parameter_ages():
    _, opt = model_and_optimizer("adam")
    new = apply_strategy(opt.state_dict(), "keep-v:^0\\.", names=["0.weight", "0.bias", "2.weight", "2.bias"])
    assert V_AGE_KEY not in new["param_groups"][0]
    assert new["param_groups"][0][AGE_OFFSETS_KEY] == {"m": [0.0] * 4, "v": [20.0, 20.0, 0.0, 0.0]}


def test_keep_v_of_whole_groups_selected_by_regex_is_accepted():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 1e-3}])
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    new = apply_strategy(opt.state_dict(), "keep-v:^0\\.", names=["0.weight", "0.bias", "2.weight", "2.bias"])
    assert new["param_groups"][0][V_AGE_KEY] == 1.0 and V_AGE_KEY not in new["param_groups"][1]
    assert float(new["state"][2]["step"]) == 1.0  # the other group is reloaded


def test_a_reset_of_v_drops_an_age_recorded_by_an_earlier_keep_v():
    _, opt = model_and_optimizer("adam")
    kept = apply_strategy(opt.state_dict(), "keep-v")
    assert V_AGE_KEY not in apply_strategy(kept, "reset-v")["param_groups"][0]
    assert apply_strategy(kept, "reload")["param_groups"][0][V_AGE_KEY] == 20.0


def test_reload_with_a_regex_reloads_only_the_matching_parameters_and_starts_the_rest_fresh():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.named_parameters())  # torch >= 2.6 saves param_names
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    new = apply_strategy(saved, r"reload:^(?!2\.)")
    assert sorted(new["state"]) == [0, 1]
    assert (
        plan(saved, "fresh:^2\\.")
        == plan(saved, r"reload:^(?!2\.)")
        == {0: "reload", 1: "reload", 2: "fresh", 3: "fresh"}
    )


def test_a_regex_that_matches_nothing_is_an_error_that_lists_the_names():
    _, opt = model_and_optimizer("adam")
    with pytest.raises(OstateError, match="matches no parameter name.*0.weight"):
        apply_strategy(opt.state_dict(), "reset-v:head", names=["0.weight", "0.bias", "2.weight", "2.bias"])


def test_a_regex_needs_names_when_the_state_dict_has_none():
    _, opt = model_and_optimizer("adam")
    with pytest.raises(OstateError, match="does not name its parameters"):
        apply_strategy(opt.state_dict(), "reset-v:bias")


def test_unknown_kinds_allow_only_fresh_and_reload():
    model = nn.Linear(2, 2)
    opt = torch.optim.Rprop(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert apply_strategy(opt.state_dict(), "fresh", kind="rprop")["state"] == {}
    with pytest.raises(OstateError, match="no known state layout"):
        apply_strategy(opt.state_dict(), "reset-v", kind="rprop")


@pytest.mark.parametrize(
    "text, message",
    [
        ("reset", "unknown strategy"),
        ("reload:", "empty parameter regex"),
        ("reload:(", "does not compile"),
    ],
)
def test_bad_strategy_text_is_refused_with_the_choices(text, message):
    with pytest.raises(OstateError, match=message):
        Strategy.parse(text)


def test_the_layouts_cover_the_families_the_harness_promises():
    LAYOUTS = {name for name, family in families().items() if family.layout is not None}
    assert {"adam", "adamw", "nadam", "radam", "sgd", "rmsprop", "adagrad"} <= set(LAYOUTS)
    assert {kind_of(n) for n in OPTIMIZERS} <= set(LAYOUTS)


@pytest.mark.parametrize("strategy", ["reset-v", "reset-m", "keep-v"])
def test_centred_rmsprop_keeps_its_variance_estimate_whole(strategy):
    # Centred RMSprop divides by sqrt(square_avg - grad_avg^2): zeroing square_avg alone made
    # the variance negative and the first step wrote NaN into the weights.
    model, opt = model_and_optimizer("rmsprop", steps=20)
    saved = opt.state_dict()
    new = apply_strategy(copy.deepcopy(saved), strategy, kind="rmsprop")
    for before, after in zip(saved["state"].values(), new["state"].values()):
        v_reset = strategy == "reset-v"
        for key in ("square_avg", "grad_avg"):
            assert torch.equal(after[key], torch.zeros_like(before[key]) if v_reset else before[key]), key
        assert torch.equal(
            after["momentum_buffer"],
            before["momentum_buffer"] if v_reset else torch.zeros_like(before["momentum_buffer"]),
        )
    opt.load_state_dict(new)
    step_with(model, opt, fixed_grads(model, 3))
    assert all(torch.isfinite(p).all() for p in model.parameters())


class MyAdamW(torch.optim.AdamW):
    """A subclass as users write them: ostate's detection calls its state AdamW, and so must the strategies."""


def test_the_kind_of_a_live_optimizer_comes_from_its_keys_not_its_class_name():
    params = [nn.Parameter(torch.ones(2))]
    assert optimizer_kind(MyAdamW(params)) == "adamw"  # no state yet: the group keys decide
    assert optimizer_kind(torch.optim.Adam(params, decoupled_weight_decay=True)) == "adamw"
    for name, make in OPTIMIZERS.items():
        fresh = make([nn.Parameter(torch.ones(2))])
        assert optimizer_kind(fresh) == kind_of(name)
        assert optimizer_kind(model_and_optimizer(name, steps=2)[1]) == kind_of(name)


@pytest.mark.parametrize("strategy", ["reset-v", "reset-m", "keep-v"])
def test_a_subclass_of_adamw_gets_exactly_the_state_and_steps_of_adamw(strategy):
    runs = {}
    for cls in (torch.optim.AdamW, MyAdamW):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1)
        for seed in range(5):
            step_with(model, opt, fixed_grads(model, seed))
        new = apply_strategy(opt.state_dict(), strategy, kind=optimizer_kind(opt))
        new = copy.deepcopy(new)
        opt.load_state_dict(new)
        detach = attach(opt)
        delta = step_with(model, opt, fixed_grads(model, 9))
        detach()
        runs[cls] = (new, delta)
    (plain, plain_delta), (sub, sub_delta) = runs[torch.optim.AdamW], runs[MyAdamW]
    assert plain["param_groups"] == sub["param_groups"]
    assert plain["state"].keys() == sub["state"].keys()
    for index, state in plain["state"].items():
        assert state.keys() == sub["state"][index].keys()
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sub["state"][index][key])), (index, key)
    assert all(torch.equal(a, b) for a, b in zip(plain_delta, sub_delta))


def test_the_hint_for_a_kind_without_a_layout_lists_the_families_that_have_one():
    with pytest.raises(OstateError) as info:
        apply_strategy(model_and_optimizer("adam", steps=1)[1].state_dict(), "reset-v", kind="rprop")
    assert info.value.hint == (
        "kinds with partial strategies: adadelta, adagrad, adam, adam_mini, adamax, adamw, came, dadapt_adam, dadapt_adan, dadapt_lion, nadam, prodigy, radam, rmsprop, schedulefree_adamw, schedulefree_radam, sgd"
    )


def test_a_stepped_bitsandbytes_optimizer_is_its_family_once_its_nested_state_is_unwrapped():
    """bitsandbytes nests its quantisation state in state_dict(); detection reads it as ostate.load does."""
    bnb = pytest.importorskip("bitsandbytes")
    p = nn.Parameter(torch.ones(4096))
    optimizer = bnb.optim.Adam8bit([p], lr=1e-3)
    p.grad = torch.ones(4096)
    optimizer.step()
    assert optimizer_kind(optimizer) == "bnb_adam"


def _adam_part(delta, theta, group, decoupled):
    return delta + (group["lr"] * group["weight_decay"] * theta if decoupled else 0)


@pytest.mark.parametrize("name", ["adam", "adamw", "amsgrad"])
@pytest.mark.parametrize("strategy", ["reset-m-ac", "reset-v-ac", "keep-v"])
def test_age_correct_strategies_correct_each_moment_by_its_own_age(name, strategy):
    """The oracle: a fresh (F) and a reloaded (R) real optimizer fed the same gradients. A restarted
    moment equals F's, a kept one R's; the age-correct step is m / (1 - beta1^a_m) over
    sqrt(v / (1 - beta2^a_v)) + eps with each moment's own age (restarted: s, kept: T + s)."""
    model, opt = model_and_optimizer(name, steps=30, dtype=torch.float64)
    saved = opt.state_dict()
    T = float(saved["state"][0]["step"])
    models = [copy.deepcopy(model) for _ in range(3)]
    fresh, reloaded, tested = (OPTIMIZERS[name](m.parameters()) for m in models)
    reloaded.load_state_dict(copy.deepcopy(saved))
    tested.load_state_dict(copy.deepcopy(apply_strategy(saved, strategy, kind=optimizer_kind(opt))))
    attach(tested)
    group = tested.param_groups[0]
    lr, eps, wd, (beta1, beta2) = group["lr"], group["eps"], group["weight_decay"], group["betas"]
    decoupled = name == "adamw"
    second = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    m_fresh = strategy in ("reset-m-ac", "keep-v")
    for s in range(1, 6):
        grads = fixed_grads(model, 10 + s)
        theta = [p.detach().clone() for p in models[2].parameters()]
        step_with(models[0], fresh, grads), step_with(models[1], reloaded, grads)
        d_t = step_with(models[2], tested, grads)
        for i in range(len(d_t)):
            p_f, p_r = list(models[0].parameters())[i], list(models[1].parameters())[i]
            m = (fresh.state[p_f] if m_fresh else reloaded.state[p_r])["exp_avg"]
            v = (reloaded.state[p_r] if m_fresh else fresh.state[p_f])[second]
            a_m, a_v = (s, T + s) if m_fresh else (T + s, s)
            expected = -lr * (m / (1 - beta1**a_m)) / ((v / (1 - beta2**a_v)).sqrt() + eps)
            expected = expected - (lr * wd * theta[i] if decoupled else 0)
            torch.testing.assert_close(d_t[i], expected, rtol=1e-9, atol=1e-14)
    assert group["lr"] == lr and group["eps"] == eps and group["weight_decay"] == wd


def _radam_rect(t, beta2):
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
    if rho <= 5:
        return None
    return ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5


@pytest.mark.parametrize("strategy", ["reset-v-ac", "keep-v", "reset-m-ac", "reset-step"])
def test_radam_rectification_follows_the_age_of_v(strategy):
    """RAdam, stepped for real: the step is lr m/(1 - beta1^a_m) * r(a_v) sqrt(1 - beta2^a_v)/(sqrt(v) + eps)
    once rho(a_v) > 5, else lr m/(1 - beta1^a_m) with no adaptivity. reset-v-ac: v is new (a_v = s), so
    the first steps are un-rectified; keep-v keeps v's age (rectified at once); reset-step (Adam-Rel)
    restarts both ages, so its first steps are un-rectified although v is mature."""
    model, opt = model_and_optimizer("radam", steps=30, dtype=torch.float64)
    saved = opt.state_dict()
    T = float(saved["state"][0]["step"])
    models = [copy.deepcopy(model) for _ in range(3)]
    fresh, reloaded, tested = (OPTIMIZERS["radam"](m.parameters()) for m in models)
    reloaded.load_state_dict(copy.deepcopy(saved))
    tested.load_state_dict(copy.deepcopy(apply_strategy(saved, strategy, kind="radam")))
    attach(tested)
    group = tested.param_groups[0]
    lr, eps, (beta1, beta2) = group["lr"], group["eps"], group["betas"]
    m_fresh = strategy in ("reset-m-ac", "keep-v")
    v_fresh = strategy == "reset-v-ac"
    rectified_seen = set()
    for s in range(1, 8):
        grads = fixed_grads(model, 10 + s)
        step_with(models[0], fresh, grads), step_with(models[1], reloaded, grads)
        d_t = step_with(models[2], tested, grads)
        a_m = s if (m_fresh or strategy == "reset-step") else T + s
        a_v = s if (v_fresh or strategy == "reset-step") else T + s
        r = _radam_rect(a_v, beta2)
        rectified_seen.add(r is not None)
        for i in range(len(d_t)):
            p_f, p_r = list(models[0].parameters())[i], list(models[1].parameters())[i]
            m = (fresh.state[p_f] if m_fresh else reloaded.state[p_r])["exp_avg"]
            v = (fresh.state[p_f] if v_fresh else reloaded.state[p_r])["exp_avg_sq"]
            expected = -lr * m / (1 - beta1**a_m)
            if r is not None:
                expected = expected * r * (1 - beta2**a_v) ** 0.5 / (v.sqrt() + eps)
            torch.testing.assert_close(d_t[i], expected, rtol=1e-9, atol=1e-14)
        assert (
            float(tested.state[list(models[2].parameters())[0]]["step"])
            == (0 if strategy in ("keep-v", "reset-step") else T) + s
        )
    assert rectified_seen == ({True} if strategy in ("keep-v", "reset-m-ac") else {False, True})


def test_keep_v_corrects_each_parameter_from_its_own_step():
    """A parameter that skipped steps (an MoE expert without tokens) has its own age: keep-v on a
    group whose parameters have different step counts gives each the correction of its own age."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(3, dtype=torch.float64)), nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = torch.optim.Adam([a, b], lr=1e-2)
    for k in range(12):
        a.grad = torch.randn(3, dtype=torch.float64)
        b.grad = torch.randn(3, dtype=torch.float64) if k % 3 == 0 else None  # b steps 4 times only
        opt.step()
    saved = opt.state_dict()
    new = apply_strategy(saved, "keep-v")
    assert new["param_groups"][0][AGE_OFFSETS_KEY]["v"] == [12.0, 4.0]
    opt.load_state_dict(copy.deepcopy(new))
    attach(opt)
    g = torch.randn(3, dtype=torch.float64)
    for p, T in ((a, 12), (b, 4)):
        before = p.detach().clone()
        v = 0.999 * saved["state"][0 if p is a else 1]["exp_avg_sq"] + 0.001 * g * g
        a.grad, b.grad = (g.clone(), None) if p is a else (None, g.clone())
        opt.step()
        expected = -1e-2 * g / ((v / (1 - 0.999 ** (T + 1))).sqrt() + 1e-8)
        torch.testing.assert_close(p.detach() - before, expected, rtol=1e-9, atol=1e-15)


def test_adam_rel_is_reset_step_and_age_correct_names_parse():
    assert str(Strategy.parse("adam-rel")) == "reset-step"
    assert str(Strategy.parse("reset-v-age-correct:embed")) == "reset-v-ac:embed"


def test_age_correct_strategies_are_refused_where_no_moment_has_an_age():
    _, opt = model_and_optimizer("adamax")
    with pytest.raises(OstateError, match="no bias correction by age"):
        apply_strategy(opt.state_dict(), "reset-v-ac", kind="adamax")


def test_adadelta_reset_v_is_fresh():
    """Adadelta's state is its two averages and a step that does not enter the update: reset-v
    resets both averages, so it steps exactly like fresh."""
    model, opt = model_and_optimizer("adadelta")
    twin, twin_opt = copy.deepcopy(model), OPTIMIZERS["adadelta"](copy.deepcopy(model).parameters())
    twin_opt = OPTIMIZERS["adadelta"](twin.parameters())
    opt.load_state_dict(apply_strategy(opt.state_dict(), "reset-v", kind="adadelta"))
    twin_opt.load_state_dict(apply_strategy(twin_opt.state_dict(), "fresh", kind="adadelta"))
    for k in range(3):
        grads = fixed_grads(model, k)
        assert all(torch.equal(x, y) for x, y in zip(step_with(model, opt, grads), step_with(twin, twin_opt, grads)))
