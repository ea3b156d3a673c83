"""Adam, AdamW, AMSGrad and SGD math in ostate against the real torch optimizers.

The oracle is torch itself: run the optimizer, save its state with torch.save, load it
through ostate, then compare ostate's next update with what the optimizer's next
``step()`` does (max relative error <= 1e-5 in float32), and the effective learning
rate with the step torch actually took.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ostate
from tests.helpers.common import Net, train
from tests.helpers.oracle import TOLERANCE, check_next_update, relative_error, saved_and_loaded, update_quantity_errors

ADAM_CASES = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adam-l2-decay": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-3, amsgrad=True, weight_decay=0.01),
    "adam-amsgrad-maximize": lambda ps: torch.optim.Adam(ps, lr=5e-4, amsgrad=True, maximize=True),
    "adamw-betas-eps": lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.8, 0.95), eps=1e-6),
    "adam-decoupled-flag": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True),
}


@pytest.mark.parametrize("steps", [1, 7])
@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_adam_family_next_update_matches_torch_step(tmp_path, case, steps):
    check_next_update(tmp_path, ADAM_CASES[case], steps)


SGD_CASES = {
    "plain": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-3),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "maximize": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.5, maximize=True),
}


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_sgd_next_update_matches_torch_step(tmp_path, case, steps):
    check_next_update(tmp_path, SGD_CASES[case], steps, kind="sgd")


def test_adam_kinds_are_told_apart_by_their_groups(tmp_path):
    for make, kind in [
        (ADAM_CASES["adam"], "adam"),
        (ADAM_CASES["adamw"], "adamw"),
        (ADAM_CASES["adam-decoupled-flag"], "adamw"),
    ]:
        model = Net()
        opt = make(model.parameters())
        train(model, opt, steps=1)
        loaded = saved_and_loaded(tmp_path, model, opt)
        assert (loaded.kind, loaded.kind_source) == (kind, "detected")


@pytest.mark.parametrize("amsgrad", [False, True])
def test_effective_lr_times_bias_corrected_moment_is_the_step_torch_took(tmp_path, amsgrad):
    # float64 and no weight decay: the last step was exactly -eff_lr * exp_avg / (1 - beta1^t).
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.85, 0.99), eps=1e-7, amsgrad=amsgrad)
    train(model, opt, steps=4)
    before = copy.deepcopy(model)
    train(model, opt, steps=1, seed=5)
    loaded = saved_and_loaded(tmp_path, model, opt)
    for i, (p_old, p_new) in enumerate(zip(before.parameters(), model.parameters())):
        param = loaded.params[i]
        group = loaded.groups[0]
        eta = ostate.effective_lr(param, group)
        m_hat = param.read("exp_avg") / (1 - 0.85**param.step)
        predicted_step = -(eta.double() * m_hat)
        actual_step = p_new.detach() - p_old.detach()
        assert relative_error(predicted_step, actual_step) <= 1e-5


def test_effective_lr_formula_uses_saved_lr_step_and_eps(tmp_path):
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    train(model, opt, steps=3)
    loaded = saved_and_loaded(tmp_path, model, opt)
    p = loaded.params[0]
    v = opt.state[next(model.parameters())]["exp_avg_sq"]
    expected = 1e-3 / (v.sqrt() / (1 - 0.999**3) ** 0.5 + 1e-8)
    torch.testing.assert_close(ostate.effective_lr(p, loaded.groups[0]), expected, rtol=1e-6, atol=0)


def test_sgd_steady_state_lr_reports_momentum_and_nesterov_limits():
    from ostate.optimizers.sgd import steady_state_lr

    assert steady_state_lr(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False) == pytest.approx(1.0)
    assert steady_state_lr(lr=0.1, momentum=0.9, dampening=0.5, nesterov=False) == pytest.approx(0.5)
    assert steady_state_lr(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True) == pytest.approx(1.0)
    assert steady_state_lr(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False) == pytest.approx(0.1)


@pytest.mark.parametrize("dampening,nesterov", [(0.2, False), (0.0, True)])
def test_sgd_steady_state_lr_is_what_a_constant_gradient_converges_to(dampening, nesterov):
    from ostate.optimizers.sgd import steady_state_lr

    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.8, dampening=dampening, nesterov=nesterov)
    for _ in range(400):
        before = p.detach().clone()
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
    assert float(before - p.detach()) == pytest.approx(
        steady_state_lr(lr=0.1, momentum=0.8, dampening=dampening, nesterov=nesterov), rel=1e-9
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=2e-3, weight_decay=0.0),
        lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True, betas=(0.8, 0.9)),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, dampening=0.5),
    ],
    ids=["adam", "adamw", "amsgrad", "sgd", "sgd-nesterov", "sgd-dampening"],
)
def test_update_quantity_is_the_next_step_with_a_zero_gradient(tmp_path, make):
    assert max(update_quantity_errors(tmp_path, make, steps=3)) <= TOLERANCE


def test_snr_is_bias_corrected_first_over_second_moment(tmp_path):
    from ostate.optimizers.adam import adam_snr

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    train(model, opt, steps=5)
    state = opt.state[model.head.weight]
    expected = (state["exp_avg"].abs() / (1 - 0.9**5)) / (state["exp_avg_sq"] / (1 - 0.95**5)).sqrt()
    ours = adam_snr(state["exp_avg"], state["exp_avg_sq"], beta1=0.9, beta2=0.95, step=5)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)
    zero = adam_snr(torch.zeros(2), torch.zeros(2), beta1=0.9, beta2=0.95, step=5)
    assert zero.tolist() == [0.0, 0.0]
