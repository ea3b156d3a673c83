"""A parameter without state (an optimizer saved before its first step, a new head): its first step
predicted from the group's hyperparameters and the family's initial state, against the real ``step()``.

Every family of tests/helpers/families.py (torch's, transformers' Adafactor, lion-pytorch,
schedule-free, bitsandbytes) is built, saved before it ever steps, loaded through ostate,
and ostate's ``next_update`` compared with the optimizer's own first step.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import ostate
from ostate.errors import OstateError
from ostate.optimizers import get_family
from tests.helpers.common import Net, run_cli, saved, train
from tests.helpers.families import FAMILIES
from tests.helpers.oracle import actual_step, assert_matches, predicted_updates, saved_and_loaded, set_next_gradient

THIRD_PARTY = {
    "transformers.Adafactor": "transformers",
    "lion_pytorch.Lion": "lion_pytorch",
    "schedulefree.AdamWScheduleFree": "schedulefree",
}
# The first step's rate where it does not depend on the gradient: the group's lr (Muon: its adjusted lr).
NOT_ADAPTIVE = {"sgd", "radam", "asgd", "rprop", "muon", "lion", "bnb_lion", "bnb_momentum"}


def never_stepped(name: str, tmp_path):
    """The real optimizer ``name`` over its test model, saved before its first step and loaded by ostate."""
    kind, make_model, make_opt = FAMILIES[name]
    if name in THIRD_PARTY:
        pytest.importorskip(THIRD_PARTY[name])
    if name.startswith("bitsandbytes."):
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_opt(model.parameters())
    # Optimizers whose groups alone do not tell them apart (bitsandbytes') are named, as with --optimizer.
    loaded = saved_and_loaded(tmp_path, model, opt, kind=kind)
    assert loaded.kind == kind
    return model, opt, loaded


@pytest.mark.parametrize("name", sorted(n for n in FAMILIES if n != "LBFGS"))
def test_the_first_step_of_an_optimizer_that_never_stepped_is_predicted_exactly(tmp_path, name):
    model, opt, loaded = never_stepped(name, tmp_path)
    # torch creates Adagrad's state in its constructor; every other family has none yet.
    assert all(p.has_state for p in loaded.params) == (name == "Adagrad")
    set_next_gradient(model)
    predicted = [
        ostate.next_update(p, loaded.groups[p.group], w.grad.clone(), w.detach().clone(), kind=loaded.kind)
        for p, w in zip(loaded.params, model.parameters())
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        actual = actual_step(model, opt.step)
    assert any(bool(a.abs().max() > 0) for a in actual)
    # bitsandbytes' 8-bit kernels order their float32 operations differently from the 32-bit ones.
    assert_matches(predicted, actual, tolerance=1e-5 if name.startswith("bitsandbytes.") else 1e-6)


@pytest.mark.parametrize("name", sorted(n for n in FAMILIES if n not in ("LBFGS", "Adagrad")))
def test_effective_lr_of_a_first_step_is_the_lr_or_refused_with_the_reason(tmp_path, name):
    model, opt, loaded = never_stepped(name, tmp_path)
    param, group = loaded.params[0], loaded.groups[0]
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
    # The first step's rate is the group's lr (RAdam: unrectified; ASGD's eta and Rprop's step size start at lr).
    assert torch.equal(eta, torch.full(param.shape, float(group["lr"])))
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
    kinds = {kind for kind, _model, _make in FAMILIES.values()}
    assert {k for k in kinds if get_family(k).first_step is None} == {"lbfgs"}


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
