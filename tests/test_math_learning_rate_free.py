"""Prodigy (prodigyopt) and D-Adaptation Adam (dadaptation), against the real libraries' next step.

Both learn a step size d that multiplies lr; these tests train the real optimizers, save
the state with torch.save, load it through ostate, and compare ostate's next update,
effective learning rate and zero-gradient update with the libraries' own ``step()``.
"""

from __future__ import annotations

import pytest
import torch

import ostate
from ostate.optimizers import get_family
from ostate.optimizers.dadapt import d_lr, prodigy_step
from tests.helpers.common import Net, saved, train
from tests.helpers.oracle import (
    TOLERANCE,
    actual_step,
    check_next_update,
    relative_error,
    saved_and_loaded,
    set_next_gradient,
    update_quantity_errors,
)

prodigyopt = pytest.importorskip("prodigyopt")
dadaptation = pytest.importorskip("dadaptation")

PRODIGY_CASES = {
    "defaults": lambda ps: prodigyopt.Prodigy(ps, lr=1.0),
    "bias-correction-decay": lambda ps: prodigyopt.Prodigy(
        ps, lr=1.0, use_bias_correction=True, weight_decay=0.01, betas=(0.9, 0.99)
    ),
    "coupled-decay-warmup-slice": lambda ps: prodigyopt.Prodigy(
        ps, lr=0.5, weight_decay=0.1, decouple=False, safeguard_warmup=True, slice_p=3
    ),
    "no-first-moment": lambda ps: prodigyopt.Prodigy(ps, lr=1.0, betas=(0.0, 0.999)),
}
DADAPT_CASES = {
    "defaults": lambda ps: dadaptation.DAdaptAdam(ps, lr=1.0),
    "bias-correction-decay": lambda ps: dadaptation.DAdaptAdam(
        ps, lr=1.0, use_bias_correction=True, weight_decay=0.01, decouple=True
    ),
    "coupled-decay": lambda ps: dadaptation.DAdaptAdam(ps, lr=0.5, weight_decay=0.1, betas=(0.8, 0.99)),
}


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("case", sorted(PRODIGY_CASES))
def test_prodigy_step_matches_the_real_step(tmp_path, case, steps):
    """The formula with the step's new d (which needs every parameter's gradient) is the real step."""
    torch.manual_seed(0)
    model = Net()
    opt = PRODIGY_CASES[case](model.parameters())
    train(model, opt, steps=steps)
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert (loaded.kind, loaded.kind_source) == ("prodigy", "detected")
    set_next_gradient(model)
    grads = [p.grad.clone() for p in model.parameters()]
    actual = actual_step(model, opt.step)
    next_d = opt.param_groups[0]["d"]
    for p, grad, taken, weight in zip(loaded.params, grads, actual, model.parameters()):
        ours = prodigy_step(p, loaded.groups[p.group], grad, weight.detach() - taken, next_d=next_d)
        assert relative_error(ours, taken) <= TOLERANCE


def test_prodigy_next_update_is_exact_where_d_does_not_enter_the_eps_term(tmp_path):
    loaded = check_next_update(tmp_path, lambda ps: prodigyopt.Prodigy(ps, lr=1.0, eps=1e-30), 4, kind="prodigy")
    assert loaded.groups[0]["d"] > loaded.groups[0]["d0"]  # d has grown: the test would see a missing factor


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("case", sorted(DADAPT_CASES))
def test_dadapt_adam_next_update_matches_the_real_step(tmp_path, case, steps):
    check_next_update(tmp_path, DADAPT_CASES[case], steps, kind="dadapt_adam")


@pytest.mark.parametrize(
    "make",
    [
        PRODIGY_CASES["defaults"],
        lambda ps: prodigyopt.Prodigy(ps, lr=1.0, use_bias_correction=True, betas=(0.9, 0.99)),
        lambda ps: dadaptation.DAdaptAdam(ps, lr=1.0, use_bias_correction=True),
    ],
    ids=["prodigy", "prodigy-bias-correction", "dadapt-adam"],
)
def test_update_quantity_is_the_real_step_with_a_zero_gradient(tmp_path, make):
    assert max(update_quantity_errors(tmp_path, make, steps=4)) <= TOLERANCE


def test_effective_lr_includes_d_and_is_the_factor_on_a_new_gradient(tmp_path):
    """eff_lr is the factor on a gradient in the next step: with m zeroed (reset-m) and eps negligible,
    Prodigy's step on a small gradient g is -eff_lr * (1 - beta1) * g / sqrt(beta2)."""
    torch.manual_seed(0)
    model = Net().double()
    opt = prodigyopt.Prodigy(model.parameters(), lr=1.0, betas=(0.9, 0.999), eps=1e-30)
    train(model, opt, steps=6)
    loaded = saved_and_loaded(tmp_path, model, opt)
    group = loaded.groups[0]
    d = group["d"]
    assert d == opt.param_groups[0]["d"] and d > 1e-5  # grown from d0 = 1e-6
    param = loaded.param("hidden.weight")
    v = opt.state[model.hidden.weight]["exp_avg_sq"]
    eff = ostate.effective_lr(param, group)
    torch.testing.assert_close(eff, d / (v.sqrt() / d + 1e-30), rtol=1e-6, atol=0)
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p]["exp_avg"].zero_()
            p.grad = torch.full_like(p, 1e-12)
            p.zero_()  # the step is then the new weights, without rounding against the old ones
    taken = actual_step(model, opt.step)[6]
    torch.testing.assert_close(taken, -eff * (1 - 0.9) * 1e-12 / 0.999**0.5, rtol=1e-5, atol=0)


def test_inspect_and_doctor_show_d_per_group(tmp_path):
    torch.manual_seed(0)
    model = Net()
    params = list(model.parameters())  # two groups in the model's order: ostate names them by it
    opt = dadaptation.DAdaptAdam([{"params": params[:6]}, {"params": params[6:], "layer_scale": 0.5}], lr=1.0)
    train(model, opt, steps=4)
    path = saved(tmp_path, model, opt)
    ckpt = ostate.load(path)
    o = ckpt.optimizers[0]
    assert (o.kind, o.kind_source) == ("dadapt_adam", "detected")
    table = ostate.analyze(ckpt).set_index("name")
    d = opt.param_groups[0]["d"]
    assert table.loc["hidden.weight", "d"] == d
    assert table.loc["hidden.weight", "d_lr"] == pytest.approx(d_lr(opt.param_groups[0]))
    # layer_scale halves the second group's effective lr at equal v.
    bias = model.hidden.bias
    v = opt.state[bias]["exp_avg_sq"].float()
    assert table.loc["hidden.bias", "eff_lr_max"] == pytest.approx(float((0.5 * d / (v.sqrt() + 1e-8)).max()), rel=1e-5)
    from ostate.doctor import diagnose

    findings = [f for f in diagnose(ckpt).findings if f.code == "learned-step-size"]
    assert len(findings) == 1 and findings[0].severity == "info"
    assert [e.subject for e in findings[0].evidence] == ["group 0", "group 1"]
    assert f"d={d:.4g}" in findings[0].evidence[0].detail


def test_strategies_reset_moments_and_refuse_the_unused_step(tmp_path):
    from ostate.reset.strategies import apply_strategy

    torch.manual_seed(0)
    model = Net()
    opt = prodigyopt.Prodigy(model.parameters(), lr=1.0)
    train(model, opt, steps=3)
    sd = opt.state_dict()
    new = apply_strategy(sd, "reset-m")
    assert all(float(s["exp_avg"].abs().sum()) == 0 for s in new["state"].values())
    assert all(torch.equal(s["exp_avg_sq"], sd["state"][i]["exp_avg_sq"]) for i, s in new["state"].items())
    opt.load_state_dict(new)  # loads into the real optimizer
    for strategy in ("reset-step", "keep-v"):
        with pytest.raises(ostate.OstateError, match="does not"):
            apply_strategy(sd, strategy)


def test_a_family_recognised_from_keys_not_from_class_names():
    for kind in ("prodigy", "dadapt_adam", "dadapt_sgd", "dadapt_adagrad", "dadapt_lion", "dadapt_adan"):
        assert get_family(kind).lr_scale == "d"


# D-Adaptation's other optimizers: each steps with the saved d (the new estimate enters the step after),
# so next_update is their step exactly.
VARIANT_CASES = {
    "dadapt_sgd-defaults": lambda ps: dadaptation.DAdaptSGD(ps, lr=1.0),
    "dadapt_sgd-momentum-decay": lambda ps: dadaptation.DAdaptSGD(ps, lr=0.5, momentum=0.9, weight_decay=0.01),
    "dadapt_adagrad-defaults": lambda ps: dadaptation.DAdaptAdaGrad(ps, lr=1.0),
    "dadapt_adagrad-momentum-decay": lambda ps: dadaptation.DAdaptAdaGrad(
        ps, lr=1.0, momentum=0.9, weight_decay=0.01, eps=1e-4
    ),
    "dadapt_lion-defaults": lambda ps: dadaptation.DAdaptLion(ps, lr=1.0),
    "dadapt_lion-decay-betas": lambda ps: dadaptation.DAdaptLion(ps, lr=1.0, betas=(0.8, 0.95), weight_decay=0.1),
    "dadapt_adan-defaults": lambda ps: dadaptation.DAdaptAdan(ps, lr=1.0),
    "dadapt_adan-no-prox": lambda ps: dadaptation.DAdaptAdan(ps, lr=1.0, no_prox=True, weight_decay=0.1),
}


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("case", sorted(VARIANT_CASES))
def test_dadaptation_variants_next_update_matches_the_real_step(tmp_path, case, steps):
    loaded = check_next_update(tmp_path, VARIANT_CASES[case], steps, kind=case.split("-")[0])
    if steps == 5:
        assert loaded.groups[0]["d"] > 1e-6  # d has grown: a missing factor d would show


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: dadaptation.DAdaptLion(ps, lr=1.0),
        lambda ps: dadaptation.DAdaptAdan(ps, lr=1.0, weight_decay=0.0),
    ],
    ids=["dadapt-lion", "dadapt-adan"],
)
def test_variants_update_quantity_is_the_real_step_with_a_zero_gradient(tmp_path, make):
    assert max(update_quantity_errors(tmp_path, make, steps=4)) <= TOLERANCE


def _trained_double(tmp_path, make, steps=6):
    torch.manual_seed(0)
    model = Net().double()
    opt = make(model.parameters())
    train(model, opt, steps=steps)
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert loaded.groups[0]["d"] == opt.param_groups[0]["d"] > 1e-6  # grown from d0
    return model, opt, loaded


def _tiny_gradients(model, value=1e-12):
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.full_like(p, value)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_dadapt_sgd_effective_lr_is_d_lr_over_the_first_gradients_norm(tmp_path, momentum):
    """The weights move (1 - momentum) * eff_lr * g towards z = x0 - s: with x0 = s = 0 and the
    weights at 0, the real step is exactly that."""
    model, opt, loaded = _trained_double(tmp_path, lambda ps: dadaptation.DAdaptSGD(ps, lr=1.0, momentum=momentum))
    group = loaded.groups[0]
    eff = ostate.effective_lr(loaded.param("hidden.weight"), group)
    assert float(eff[0, 0]) == pytest.approx(group["d"] / group["g0_norm"], rel=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p]["s"].zero_(), opt.state[p]["x0"].zero_(), p.zero_()
    _tiny_gradients(model)
    taken = actual_step(model, opt.step)[6]
    torch.testing.assert_close(taken, -(1 - momentum) * eff.double() * 1e-12, rtol=1e-6, atol=0)


def test_dadapt_adagrad_effective_lr_includes_d_and_is_the_factor_on_a_small_gradient(tmp_path):
    model, opt, loaded = _trained_double(tmp_path, lambda ps: dadaptation.DAdaptAdaGrad(ps, lr=1.0, eps=1e-30))
    group = loaded.groups[0]
    alphak = opt.state[model.hidden.weight]["alphak"]
    eff = ostate.effective_lr(loaded.param("hidden.weight"), group)
    torch.testing.assert_close(eff.double(), group["d"] / (alphak.sqrt() + 1e-30), rtol=1e-6, atol=0)
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p]["sk"].zero_(), opt.state[p]["x0"].zero_()
    _tiny_gradients(model)
    model.zero_grad(set_to_none=False)
    _tiny_gradients(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    # the weights are computed: x0 - sk / (sqrt(alphak) + eps) = -eff * g
    torch.testing.assert_close(model.hidden.weight.detach(), -eff.double() * 1e-12, rtol=1e-6, atol=0)
    assert not torch.equal(before[6], model.hidden.weight.detach())


def test_dadapt_lion_moves_every_coordinate_by_its_effective_lr_d_times_lr(tmp_path):
    model, opt, loaded = _trained_double(tmp_path, lambda ps: dadaptation.DAdaptLion(ps, lr=0.5))
    group = loaded.groups[0]
    eff = ostate.effective_lr(loaded.param("hidden.weight"), group)
    assert torch.equal(eff, torch.full(eff.shape, group["d"] * 0.5, dtype=torch.float32))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    set_next_gradient(model)
    taken = actual_step(model, opt.step)[6]
    moved = taken != 0
    assert bool(moved.any())
    torch.testing.assert_close(taken.abs()[moved], eff.double()[moved], rtol=1e-6, atol=0)


def test_dadapt_adan_effective_lr_includes_d_and_is_the_factor_on_a_new_gradient(tmp_path):
    """With both momenta zeroed and the previous gradient equal to the new one (no difference),
    the real step on a small gradient g is -eff_lr * (1 - beta1) * g / sqrt(beta3)."""
    model, opt, loaded = _trained_double(tmp_path, lambda ps: dadaptation.DAdaptAdan(ps, lr=1.0, eps=1e-30))
    group = loaded.groups[0]
    v = opt.state[model.hidden.weight]["exp_avg_sq"]
    eff = ostate.effective_lr(loaded.param("hidden.weight"), group)
    torch.testing.assert_close(eff.double(), group["d"] / (v.sqrt() + 1e-30), rtol=1e-6, atol=0)
    beta1, _beta2, beta3 = group["betas"]
    with torch.no_grad():
        for p in model.parameters():
            state = opt.state[p]
            state["exp_avg"].zero_(), state["exp_avg_diff"].zero_(), state["pre_grad"].fill_(1e-12), p.zero_()
    _tiny_gradients(model)
    taken = actual_step(model, opt.step)[6]
    torch.testing.assert_close(taken, -eff.double() * (1 - beta1) * 1e-12 / beta3**0.5, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["DAdaptSGD", "DAdaptAdaGrad", "DAdaptLion", "DAdaptAdan"])
def test_inspect_and_doctor_show_d_of_every_dadaptation_optimizer(tmp_path, name):
    from ostate.doctor import diagnose

    torch.manual_seed(0)
    model = Net()
    opt = getattr(dadaptation, name)(model.parameters(), lr=1.0)
    train(model, opt, steps=4)
    ckpt = ostate.load(saved(tmp_path, model, opt))
    kind = ckpt.optimizers[0].kind
    assert kind == "dadapt_" + name.removeprefix("DAdapt").lower() and ckpt.optimizers[0].kind_source == "detected"
    table = ostate.analyze(ckpt).set_index("name")
    group = opt.param_groups[0]
    expected = group["d"] / group["g0_norm"] if name == "DAdaptSGD" else group["d"]
    assert table.loc["hidden.weight", "d"] == group["d"]
    assert table.loc["hidden.weight", "d_lr"] == pytest.approx(expected)
    (finding,) = [f for f in diagnose(ckpt).findings if f.code == "learned-step-size"]
    assert f"d={group['d']:.4g}" in finding.evidence[0].detail
    # the step size is the d_lr column's (DAdaptSGD's divides by g0_norm), not d * lr
    assert f"step size d_lr={expected * group['lr']:.4g}" in finding.evidence[0].detail
