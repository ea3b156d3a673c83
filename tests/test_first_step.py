"""A parameter without state (an optimizer saved before its first step, a new head): its first step
predicted from the group's hyperparameters and the family's initial state, against the real ``step()``.

Every family of tests/helpers/families.py (torch's, transformers' Adafactor, lion-pytorch,
schedule-free, bitsandbytes, Prodigy, D-Adaptation, and issue 22's torchao low-bit Adam,
GaLore, CAME and SOAP) is built, saved before it ever steps, loaded through ostate, and
ostate's ``next_update`` compared with the optimizer's own first step. Adam-mini's first
step depends on what it does not save (its name lists): it is refused, with the reason.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import ostate
from ostate.analysis.summary import describe
from ostate.errors import OstateError
from ostate.optimizers import get_family
from tests.helpers.common import Net, run_cli, saved, train
from tests.helpers.families import FAMILIES, MODEL_FAMILIES
from tests.helpers.oracle import (
    actual_step,
    assert_matches,
    predicted_updates,
    relative_error,
    saved_and_loaded,
    set_next_gradient,
)

THIRD_PARTY = {
    "transformers.Adafactor": "transformers",
    "lion_pytorch.Lion": "lion_pytorch",
    "schedulefree.AdamWScheduleFree": "schedulefree",
    "schedulefree.SGDScheduleFree": "schedulefree",
    "schedulefree.RAdamScheduleFree": "schedulefree",
    "prodigyopt.Prodigy": "prodigyopt",
    "dadaptation.DAdaptAdam": "dadaptation",
    "dadaptation.DAdaptSGD": "dadaptation",
    "dadaptation.DAdaptAdaGrad": "dadaptation",
    "dadaptation.DAdaptLion": "dadaptation",
    "dadaptation.DAdaptAdan": "dadaptation",
}
# The first step's rate where it does not depend on the gradient: the group's lr (Muon: its adjusted lr).
NOT_ADAPTIVE = {
    "sgd",
    "radam",
    "asgd",
    "rprop",
    "muon",
    "lion",
    "bnb_lion",
    "bnb_momentum",
    "dadapt_lion",
    "schedulefree_sgd",  # warmup_steps 0: lr
    "schedulefree_radam",  # never rectified at step 1 (rho_1 = 1): lr, or 0 in the silent phase
}
# Families whose first step cannot be predicted from what is saved (the reason is tested below).
UNPREDICTABLE = {"adam_mini.Adam_mini"}
# DAdaptSGD's first step divides by every parameter's first gradients' norm: refused before it ever
# stepped, predicted for a new parameter of a stepped one (tested below).
NEEDS_G0 = {"dadaptation.DAdaptSGD"}


def _cases(exclude: set[str]) -> list:
    """Every family's name, torchao's marked slow (each of its steps is torch.compile'd: seconds on CPU)."""
    names = sorted({*FAMILIES, *MODEL_FAMILIES} - exclude - UNPREDICTABLE)
    return [pytest.param(n, marks=pytest.mark.slow) if n.startswith("torchao.") else n for n in names]


def never_stepped(name: str, tmp_path):
    """The real optimizer ``name`` over its test model, saved before its first step and loaded by ostate."""
    if name in MODEL_FAMILIES:
        kind, make_model, make, package = MODEL_FAMILIES[name]
        pytest.importorskip(package)
    else:
        kind, make_model, make_from_params = FAMILIES[name]
        if name in THIRD_PARTY:
            pytest.importorskip(THIRD_PARTY[name])
        if name.startswith("bitsandbytes."):
            pytest.importorskip("bitsandbytes")

        def make(model):
            return make_from_params(model.parameters())

    torch.manual_seed(0)
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make(model)
    # Optimizers whose groups alone do not tell them apart (bitsandbytes') are named, as with --optimizer.
    loaded = saved_and_loaded(tmp_path, model, opt, kind=kind)
    assert loaded.kind == kind
    return model, opt, loaded


def assert_close_to_compiled_step(predicted, actual, weights) -> None:
    """torchao's step is torch.compile'd, which fuses its float32 element-wise ops (contracting them into fused
    multiply-adds), so its new weights may differ from the same ops done one by one in their last bits: a few
    float32 ulps of the *weight*, far more than 1e-6 of an update of lr 1e-3. The quantisation plays no part in
    a first step: the moments start at exactly 0 (zero codes, zero block scales) and the update uses their new
    float32 values before re-quantising them."""
    for ours, theirs, w in zip(predicted, actual, weights):
        rounding = 4 * torch.finfo(torch.float32).eps * w.abs()
        assert bool(((ours - theirs).abs() <= rounding + 1e-6 * theirs.abs().max()).all())
    # The tolerance can fail: an update 10% off is far outside it.
    big = max(range(len(actual)), key=lambda i: actual[i].numel())
    rounding = 4 * torch.finfo(torch.float32).eps * weights[big].abs()
    assert not bool(((predicted[big] * 0.9 - actual[big]).abs() <= rounding + 1e-6 * actual[big].abs().max()).all())


@pytest.mark.parametrize("name", _cases({"LBFGS", *NEEDS_G0}))
def test_the_first_step_of_an_optimizer_that_never_stepped_is_predicted_exactly(tmp_path, name):
    model, opt, loaded = never_stepped(name, tmp_path)
    # torch creates Adagrad's state in its constructor; every other family has none yet.
    assert all(p.has_state for p in loaded.params) == (name == "Adagrad")
    set_next_gradient(model)
    weights = [w.detach().clone() for w in model.parameters()]
    # In the optimizer's order (GaLore's groups put the matrices first), then in the model's, as actual_step.
    in_optimizer = [w for g in opt.param_groups for w in g["params"]]
    by_weight = {
        id(w): ostate.next_update(p, loaded.groups[p.group], w.grad.clone(), w.detach().clone(), kind=loaded.kind)
        for p, w in zip(loaded.params, in_optimizer, strict=True)
    }
    predicted = [by_weight[id(w)] for w in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        actual = actual_step(model, opt.step)
    if loaded.kind == "soap":  # its first step() only initialises (state and bases from the gradient)
        assert all(bool((a == 0).all()) and bool((p == 0).all()) for p, a in zip(predicted, actual))
        assert len(opt.state) == len(predicted)
        return
    assert any(bool(a.abs().max() > 0) for a in actual)
    if loaded.kind.startswith("torchao"):
        # The 64 x 64 matrix's moments were quantised by that step; nothing had been saved before it.
        assert type(opt.state[model.big.weight]["exp_avg"]).__module__.startswith("torchao")
        assert_close_to_compiled_step(predicted, actual, weights)
        return
    # bitsandbytes' 8-bit kernels order their float32 operations differently from the 32-bit ones.
    assert_matches(predicted, actual, tolerance=1e-5 if name.startswith("bitsandbytes.") else 1e-6)


@pytest.mark.parametrize("name", _cases({"LBFGS", "Adagrad", *NEEDS_G0}))
def test_effective_lr_of_a_first_step_is_the_lr_or_refused_with_the_reason(tmp_path, name):
    model, opt, loaded = never_stepped(name, tmp_path)
    param, group = loaded.params[0], loaded.groups[0]
    if loaded.kind == "soap":  # the first step() moves nothing (test above): its rate is 0
        assert torch.equal(ostate.effective_lr(param, group, kind="soap"), torch.zeros(param.shape))
        return
    if loaded.kind not in NOT_ADAPTIVE:
        with pytest.raises(OstateError, match="no state yet .first step.*first gradient"):
            ostate.effective_lr(param, group, kind=loaded.kind)
        return
    eta = ostate.effective_lr(param, group, kind=loaded.kind)
    assert tuple(eta.shape) == tuple(param.shape)
    if loaded.kind == "muon":  # its rate depends on the matrix's shape only: the same as after a real step
        set_next_gradient(model)
        opt.step()
        stepped = saved_and_loaded(tmp_path, model, opt)
        torch.testing.assert_close(eta, ostate.effective_lr(stepped.params[0], stepped.groups[0]))
        return
    # The first step's rate is the group's lr (RAdam: unrectified; ASGD's eta and Rprop's step size start at lr;
    # D-Adaptation Lion's is d0 * lr, its learned step size times lr).
    rate = group["d"] * group["lr"] if loaded.kind == "dadapt_lion" else group["lr"]
    assert torch.equal(eta, torch.full(param.shape, float(rate)))
    if loaded.kind in ("lion", "bnb_lion", "rprop"):  # sign descent: the real first step moves by eta
        for g in opt.param_groups:
            g["weight_decay"] = 0.0
        set_next_gradient(model)
        weight = next(iter(model.parameters()))
        moved = weight.grad != 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            delta = actual_step(model, opt.step)[0]
        # float32 weights round the difference to a few ulps of the weight
        torch.testing.assert_close(delta.abs()[moved], eta[moved], rtol=0, atol=1e-7)


def test_a_new_head_is_predicted_beside_parameters_that_have_state(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.head.requires_grad_(False)  # the head joins later: torch keeps no state for it until then
    train(model, opt, steps=3)
    model.head.requires_grad_(True)
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert not loaded.param("head.weight").has_state and loaded.param("inp.weight").has_state
    set_next_gradient(model)
    assert_matches(predicted_updates(loaded, model), actual_step(model, opt.step), tolerance=1e-6)


def test_dadapt_sgd_refuses_a_first_step_before_g0_norm_and_predicts_a_new_head_after(tmp_path):
    dadaptation = pytest.importorskip("dadaptation")
    model, opt, loaded = never_stepped("dadaptation.DAdaptSGD", tmp_path)
    param, group = loaded.params[0], loaded.groups[0]
    set_next_gradient(model)
    weight = next(iter(model.parameters()))
    for call in (
        lambda: ostate.next_update(param, group, weight.grad, weight.detach()),
        lambda: ostate.effective_lr(param, group),
    ):
        with pytest.raises(OstateError, match="norm of every parameter's first gradient"):
            call()
    torch.manual_seed(0)
    model = Net()
    opt = dadaptation.DAdaptSGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=0.01)
    model.head.requires_grad_(False)  # the head joins later: no state for it until then
    train(model, opt, steps=3)
    model.head.requires_grad_(True)
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert not loaded.param("head.weight").has_state and loaded.groups[0]["d"] > 1e-6
    set_next_gradient(model)
    assert_matches(predicted_updates(loaded, model), actual_step(model, opt.step), tolerance=1e-6)


def test_a_family_without_the_hook_refuses_a_parameter_without_state_as_before(tmp_path, monkeypatch):
    from ostate.optimizers import registry

    model, opt, loaded = never_stepped("Adam", tmp_path)
    param, group = loaded.params[0], loaded.groups[0]
    adam = get_family("adam")
    monkeypatch.setitem(registry._BY_NAME, "adam", dataclasses.replace(adam, first_step=None))
    zeros = torch.zeros(param.shape)
    with pytest.raises(OstateError, match="needs 'exp_avg'.*may never have stepped"):
        ostate.next_update(param, group, zeros, zeros)
    with pytest.raises(OstateError, match="needs 'max_exp_avg_sq'"):
        ostate.effective_lr(param, group)


def test_the_families_of_this_suite_describe_their_first_step_and_lbfgs_does_not():
    # Families added later may leave first_step out: they refuse a parameter without state, as before.
    kinds = {kind for kind, _model, _make in FAMILIES.values()} | {v[0] for v in MODEL_FAMILIES.values()}
    assert {k for k in kinds if get_family(k).first_step is None} == {"lbfgs"}
    refused = {k for k in kinds if (get_family(k).first_step or get_family("sgd").first_step).refusal is not None}
    assert refused == {"adam_mini"}


def test_adam_mini_refuses_a_first_step_and_says_what_it_depends_on(tmp_path):
    model, opt, loaded = never_stepped("adam_mini.Adam_mini", tmp_path)
    param, group = loaded.param("hidden.weight"), loaded.groups[loaded.param("hidden.weight").group]
    reason = (
        r"'hidden.weight' has no state yet \(first step\), and optimizer kind 'adam_mini' cannot predict it: .*"
        r"name lists \(embd_names, .*\).*head size dim \* dim / n_heads: .*not saved in its state dict"
    )
    zeros = torch.zeros(param.shape)
    with pytest.raises(OstateError, match=reason):
        ostate.next_update(param, group, zeros, zeros)
    with pytest.raises(OstateError, match=reason):
        ostate.effective_lr(param, group)
    # The parameters are listed as without state, not as first steps ostate predicts.
    summary = describe(loaded)
    assert summary["params_first_step"] == [] and len(summary["params_without_state"]) == len(loaded.params)
    # What decides the split is not saved: extending a name list (as Adam-mini's own messages tell users to)
    # leaves the state dict as it was, yet makes hidden.weight one block per row instead of one whole block.
    before = str(opt.state_dict())
    opt.mlp_names.add("hidden")
    assert str(opt.state_dict()) == before
    set_next_gradient(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert "neuron_per_gpu" in opt.state[model.hidden.weight] and "neuron_per_gpu" not in opt.state[model.inp.weight]


def test_a_new_head_of_a_stepped_soap_is_predicted_with_bases_from_its_first_gradient(tmp_path):
    pytest.importorskip("pytorch_optimizer")
    kind, make_model, make, _package = MODEL_FAMILIES["pytorch_optimizer.SOAP"]
    torch.manual_seed(0)
    model = make_model()
    opt = make(model)
    for g in opt.param_groups:
        g["weight_decay"] = 0.1
    model.head.requires_grad_(False)  # the head joins later: SOAP keeps no state for it until then
    train(model, opt, steps=3)
    model.head.requires_grad_(True)
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert loaded.kind == kind and loaded.groups[0]["step"] == 3
    head = loaded.param("head.weight")
    assert not head.has_state and loaded.param("inp.weight").has_state
    set_next_gradient(model)
    predicted = predicted_updates(loaded, model)
    actual = actual_step(model, opt.step)
    assert_matches(predicted, actual, tolerance=1e-6)
    # The bases come from the head's gradient (its 3 rows: a dimension <= max_precondition_dim 6), as SOAP's.
    bases = opt.state[model.head.weight]["Q"]
    assert len(bases[0]) == 3 and len(bases[1]) == 0
    with pytest.raises(OstateError, match="no state yet .first step.*first gradient"):
        ostate.effective_lr(head, loaded.groups[head.group])


def test_galore_projects_a_first_step_on_the_first_gradient_s_singular_vectors(tmp_path):
    galore_torch = pytest.importorskip("galore_torch")
    model, opt, loaded = never_stepped("galore_torch.GaLoreAdamW", tmp_path)
    set_next_gradient(model)
    param = loaded.params[0]  # inp.weight, first in the optimizer's groups (their order leaves it unnamed)
    grad, weight = model.inp.weight.grad.clone(), model.inp.weight.detach().clone()
    delta = ostate.next_update(param, loaded.groups[param.group], grad, weight)
    # galore-torch steps w + s, then decays: w + delta = (w + s)(1 - lr * weight_decay). The step s lies in the
    # span of the gradient's top-2 right singular vectors (inp is 8 x 4: projected from the right).
    step = (weight + delta) / (1 - 1e-2 * 0.1) - weight
    basis = torch.linalg.svd(grad, full_matrices=False)[2][:2]
    assert relative_error(step @ basis.t() @ basis, step) < 1e-4 and relative_error(step, grad) > 0.1
    # Before its first step only the groups tell: a plain group fits AdamW as well, and the reading says so.
    assert "adamw, adam, galore_adamw equally" in saved_and_loaded(tmp_path, model, opt).warnings[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notice that the AdamW it builds on is deprecated
        projected_only = galore_torch.GaLoreAdamW([{**opt.param_groups[0], "params": [model.inp.weight]}])
    again = saved_and_loaded(tmp_path, model, projected_only)
    assert (again.kind, again.kind_source) == ("galore_adamw", "detected")


def test_inspect_shows_a_never_stepped_soap_optimizer_s_parameters_as_first_steps(tmp_path):
    pytest.importorskip("pytorch_optimizer")
    _kind, make_model, make, _package = MODEL_FAMILIES["pytorch_optimizer.SOAP"]
    model = make_model()
    opt = make(model)
    # Detected from its groups alone (it has no state and its groups no step yet).
    assert ostate.load(saved(tmp_path, model, opt)).optimizers[0].kind_source == "detected"
    result = run_cli("inspect", str(saved(tmp_path, model, opt)))
    assert result.returncode == 0, result.stderr
    assert "SOAP" in result.stdout and "no state yet (first step): inp.weight, inp.bias" in result.stdout


def test_inspect_shows_parameters_without_state_as_first_steps(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    model.head.requires_grad_(False)
    train(model, opt, steps=2)
    result = run_cli("inspect", str(saved(tmp_path, model, opt)))
    assert result.returncode == 0, result.stderr
    assert "no state yet (first step): head.weight, head.bias" in result.stdout
    head_rows = [line for line in result.stdout.splitlines() if line.startswith("head.")]
    assert len(head_rows) == 2 and all("no state yet (first step)" in line for line in head_rows)
