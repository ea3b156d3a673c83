"""Every other torch.optim family against the real optimizer's next step.

For each family and a spread of hyperparameters and step counts: train the real
optimizer, save it with torch.save, load it through ostate, and compare
``ostate.next_update`` with the change the optimizer's next ``step()`` makes (max
relative error <= 1e-5 in float32). Families whose recognition shares state keys with
another (Adam, RAdam, NAdam, SparseAdam) are also checked to be told apart.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ostate
from ostate.optimizers import get_family
from ostate.optimizers.radam import rectification
from tests.helpers.common import Net, train
from tests.helpers.families import lbfgs_train
from tests.helpers.oracle import (
    actual_step,
    assert_matches,
    check_next_update,
    predicted_updates,
    relative_error,
    saved_and_loaded,
    set_next_gradient,
    update_quantity_errors,
)

O = torch.optim

# (kind, optimizer factory, step counts to train before the compared step)
CASES = {
    "adamax": ("adamax", lambda ps: O.Adamax(ps, lr=2e-3), (1, 6)),
    "adamax-l2-maximize": (
        "adamax",
        lambda ps: O.Adamax(ps, lr=1e-3, weight_decay=0.1, maximize=True, betas=(0.8, 0.99)),
        (1, 6),
    ),
    "nadam": ("nadam", lambda ps: O.NAdam(ps, lr=2e-3), (1, 8)),
    "nadam-l2": ("nadam", lambda ps: O.NAdam(ps, lr=2e-3, weight_decay=0.1, momentum_decay=0.01), (1, 8)),
    "nadamw": (
        "nadam",
        lambda ps: O.NAdam(ps, lr=2e-3, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        (1, 8),
    ),
    # beta2=0.999: rectification starts at step 6, so step 4 is below and step 9 above the threshold.
    "radam": ("radam", lambda ps: O.RAdam(ps, lr=1e-3), (1, 3, 9)),
    "radam-l2": ("radam", lambda ps: O.RAdam(ps, lr=1e-3, weight_decay=0.1), (3, 9)),
    "radamw": ("radam", lambda ps: O.RAdam(ps, lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True), (3, 9)),
    "radam-beta2-0.9-maximize": ("radam", lambda ps: O.RAdam(ps, lr=1e-3, betas=(0.9, 0.9), maximize=True), (2, 7)),
    "adagrad": ("adagrad", lambda ps: O.Adagrad(ps, lr=0.05), (1, 5)),
    "adagrad-decay-init": (
        "adagrad",
        lambda ps: O.Adagrad(
            ps, lr=0.05, lr_decay=0.1, initial_accumulator_value=0.5, weight_decay=0.01, maximize=True
        ),
        (1, 5),
    ),
    "rmsprop": ("rmsprop", lambda ps: O.RMSprop(ps, lr=1e-3), (1, 5)),
    "rmsprop-centered-momentum": (
        "rmsprop",
        lambda ps: O.RMSprop(ps, lr=1e-3, centered=True, momentum=0.9, weight_decay=0.01),
        (1, 5),
    ),
    "rmsprop-momentum-maximize": (
        "rmsprop",
        lambda ps: O.RMSprop(ps, lr=1e-3, momentum=0.5, alpha=0.9, maximize=True),
        (1, 5),
    ),
    "adadelta": ("adadelta", lambda ps: O.Adadelta(ps), (1, 5)),
    "adadelta-l2-maximize": (
        "adadelta",
        lambda ps: O.Adadelta(ps, lr=0.5, rho=0.8, weight_decay=0.1, maximize=True),
        (1, 5),
    ),
    "asgd": ("asgd", lambda ps: O.ASGD(ps, lr=0.01), (1, 5)),
    # t0=2: averaging is active (mu < 1) by the compared step.
    "asgd-averaging": (
        "asgd",
        lambda ps: O.ASGD(ps, lr=0.05, lambd=0.01, t0=2, weight_decay=0.01, maximize=True),
        (1, 5),
    ),
    "rprop": ("rprop", lambda ps: O.Rprop(ps, lr=0.01), (1, 5)),
    "rprop-bounds-maximize": (
        "rprop",
        lambda ps: O.Rprop(ps, lr=0.01, etas=(0.3, 1.5), step_sizes=(1e-3, 0.02), maximize=True),
        (1, 5),
    ),
    "adafactor": ("adafactor", lambda ps: O.Adafactor(ps, lr=0.01), (1, 5)),
    "adafactor-decay-eps-maximize": (
        "adafactor",
        lambda ps: O.Adafactor(ps, lr=0.5, weight_decay=0.05, eps=(1e-20, 1e-2), d=1.0, maximize=True),
        (1, 5),
    ),
}

PARAMS = [(name, steps) for name, (_kind, _make, counts) in CASES.items() for steps in counts]


@pytest.mark.parametrize("name,steps", PARAMS, ids=[f"{n}-step{s + 1}" for n, s in PARAMS])
def test_next_update_matches_the_real_optimizers_next_step(tmp_path, name, steps):
    kind, make, _ = CASES[name]
    check_next_update(tmp_path, make, steps, kind=kind)


def test_radam_cases_cover_both_sides_of_the_rectification_threshold():
    assert rectification(4, 0.999)[1] is None and rectification(10, 0.999)[1] is not None
    assert rectification(3, 0.9)[1] is None and rectification(8, 0.9)[1] is not None


# ---------------------------------------------------------------- Muon: 2-D matrices only
class Matrices(nn.Module):
    """Three bias-free linear layers: every parameter is a matrix, as Muon requires."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16, bias=False)
        self.hidden = nn.Linear(16, 12, bias=False)
        self.head = nn.Linear(12, 3, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(torch.relu(self.inp(x)))))


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: O.Muon(ps, lr=0.02),
        lambda ps: O.Muon(ps, lr=0.02, nesterov=False, weight_decay=0.0),
        lambda ps: O.Muon(ps, lr=0.01, momentum=0.8, adjust_lr_fn="match_rms_adamw", ns_steps=3),
    ],
    ids=["nesterov", "plain", "match-rms-adamw"],
)
def test_muon_next_update_matches_the_real_step(tmp_path, make, steps):
    check_next_update(tmp_path, make, steps, kind="muon", model=Matrices())


def test_muon_and_sgd_share_state_keys_but_are_told_apart_by_groups(tmp_path):
    model = Matrices()
    muon = O.Muon(model.parameters(), lr=0.02)
    train(model, muon, steps=1)
    sgd_model = Matrices()
    sgd = O.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)
    train(sgd_model, sgd, steps=1)
    assert saved_and_loaded(tmp_path, model, muon).kind == "muon"
    assert saved_and_loaded(tmp_path, sgd_model, sgd).kind == "sgd"


# ------------------------------------------------------- SparseAdam and sparse Adagrad
class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6, sparse=True)

    def forward(self, ids):
        return self.embed(ids)


def sparse_batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 20, (8,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", [1, 6])
@pytest.mark.parametrize(
    "kind,make",
    [
        ("sparse_adam", lambda ps: O.SparseAdam(ps, lr=0.01)),
        ("sparse_adam", lambda ps: O.SparseAdam(ps, lr=0.01, betas=(0.8, 0.9), maximize=True)),
        ("adagrad", lambda ps: O.Adagrad(ps, lr=0.05, lr_decay=0.01)),
    ],
    ids=["sparse-adam", "sparse-adam-maximize", "adagrad-sparse"],
)
def test_sparse_gradient_families_match_the_real_step(tmp_path, kind, make, steps):
    torch.manual_seed(0)
    model = Embedder()
    opt = make(model.parameters())
    for s in range(steps):
        opt.zero_grad()
        model(sparse_batch(s)).square().sum().backward()
        opt.step()
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert (loaded.kind, loaded.kind_source) == (kind, "detected")
    opt.zero_grad()
    model(sparse_batch(100)).square().sum().backward()
    assert model.embed.weight.grad.is_sparse
    assert_matches(predicted_updates(loaded, model), actual_step(model, opt.step))


def test_sparse_adam_step_is_a_python_int_and_is_read(tmp_path):
    model = Embedder()
    opt = O.SparseAdam(model.parameters())
    for s in range(3):
        opt.zero_grad()
        model(sparse_batch(s)).sum().backward()
        opt.step()
    assert isinstance(opt.state_dict()["state"][0]["step"], int)
    assert saved_and_loaded(tmp_path, model, opt).params[0].step == 3.0


def test_sparse_adam_refuses_a_dense_gradient_with_a_clear_error(tmp_path):
    model = Embedder()
    opt = O.SparseAdam(model.parameters())
    model(sparse_batch(0)).sum().backward()
    opt.step()
    loaded = saved_and_loaded(tmp_path, model, opt)
    with pytest.raises(ostate.OstateError, match="sparse gradient"):
        ostate.next_update(loaded.params[0], loaded.groups[0], torch.ones(20, 6), model.embed.weight.detach())


# --------------------------------------------------------------- effective learning rates
def last_step(model, opt, steps):
    """Train, then return the change the last step made and the state after it."""
    train(model, opt, steps=steps - 1)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, steps=1, seed=5)
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("steps", [3, 9])
def test_radam_effective_lr_times_bias_corrected_momentum_is_the_step_taken(tmp_path, steps):
    # float64, no weight decay. eff_lr uses the next step's rectification, so compare it with
    # the step just taken by recomputing that step's factor from step - 1's state.
    torch.manual_seed(0)
    model = Net().double()
    opt = O.RAdam(model.parameters(), lr=1e-3)
    taken = last_step(model, opt, steps)
    loaded = saved_and_loaded(tmp_path, model, opt)
    for param, delta in zip(loaded.params, taken):
        m_hat = param.read("exp_avg") / (1 - 0.9**steps)
        _rho, rect = rectification(steps, 0.999)
        if rect is None:
            expected = -1e-3 * m_hat
        else:
            expected = -1e-3 * rect * (1 - 0.999**steps) ** 0.5 * m_hat / (param.read("exp_avg_sq").sqrt() + 1e-8)
        assert relative_error(expected, delta) <= 1e-6
    columns = get_family("radam").columns(loaded.params[0], loaded.groups[0])
    assert columns["rectified"] is (rectification(steps + 1, 0.999)[1] is not None)


def test_adagrad_effective_lr_uses_the_next_steps_decayed_lr(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = O.Adagrad(model.parameters(), lr=0.1, lr_decay=0.5, initial_accumulator_value=0.2)
    train(model, opt, steps=4)
    loaded = saved_and_loaded(tmp_path, model, opt)
    param = loaded.params[0]
    clr = 0.1 / (1 + 4 * 0.5)
    expected = clr / (opt.state[next(model.parameters())]["sum"].sqrt() + 1e-10)
    torch.testing.assert_close(ostate.effective_lr(param, loaded.groups[0]), expected, rtol=1e-6, atol=0)
    assert get_family("adagrad").columns(param, loaded.groups[0])["decayed_lr"] == pytest.approx(clr)


@pytest.mark.parametrize(
    "kind,make,formula",
    [
        ("adamax", lambda ps: O.Adamax(ps, lr=2e-3), lambda s, g: 2e-3 / s["exp_inf"]),
        (
            "adadelta",
            lambda ps: O.Adadelta(ps, lr=0.5),
            lambda s, g: 0.5 * (s["acc_delta"] + 1e-6).sqrt() / (s["square_avg"] + 1e-6).sqrt(),
        ),
        (
            "rmsprop",
            lambda ps: O.RMSprop(ps, lr=1e-3, centered=True),
            lambda s, g: 1e-3 / ((s["square_avg"] - s["grad_avg"] ** 2).sqrt() + 1e-8),
        ),
        ("rprop", lambda ps: O.Rprop(ps, lr=0.01), lambda s, g: s["step_size"]),
        ("asgd", lambda ps: O.ASGD(ps, lr=0.01), lambda s, g: s["eta"].expand_as(s["ax"])),
        (
            "nadam",
            lambda ps: O.NAdam(ps, lr=2e-3),
            lambda s, g: 2e-3 / ((s["exp_avg_sq"] / (1 - 0.999 ** float(s["step"]))).sqrt() + 1e-8),
        ),
    ],
    ids=["adamax", "adadelta", "rmsprop-centered", "rprop", "asgd", "nadam"],
)
def test_effective_lr_is_the_documented_formula_of_the_saved_state(tmp_path, kind, make, formula):
    torch.manual_seed(0)
    model = Net()
    opt = make(model.parameters())
    train(model, opt, steps=4)
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert loaded.kind == kind
    for param, p in zip(loaded.params, model.parameters()):
        expected = formula(opt.state[p], opt.param_groups[0])
        torch.testing.assert_close(ostate.effective_lr(param, loaded.groups[0]), expected.float(), rtol=1e-6, atol=0)


def test_sparse_adam_effective_lr_formula(tmp_path):
    model = Embedder()
    opt = O.SparseAdam(model.parameters(), lr=0.01)
    for s in range(4):
        opt.zero_grad()
        model(sparse_batch(s)).square().sum().backward()
        opt.step()
    loaded = saved_and_loaded(tmp_path, model, opt)
    v = opt.state[model.embed.weight]["exp_avg_sq"]
    expected = 0.01 * (1 - 0.999**4) ** 0.5 / (v.sqrt() + 1e-8)
    torch.testing.assert_close(ostate.effective_lr(loaded.params[0], loaded.groups[0]), expected, rtol=1e-6, atol=0)
    assert 0 < get_family("sparse_adam").columns(loaded.params[0], loaded.groups[0])["untouched_fraction"] < 1


def test_nadam_columns_report_the_momentum_schedule_and_catch_a_reset_step(tmp_path):
    from ostate.optimizers.nadam import momentum_at

    torch.manual_seed(0)
    model = Net()
    opt = O.NAdam(model.parameters(), lr=2e-3)
    train(model, opt, steps=5)
    loaded = saved_and_loaded(tmp_path, model, opt)
    columns = get_family("nadam").columns(loaded.params[0], loaded.groups[0])
    assert columns["mu_next"] == pytest.approx(momentum_at(6, beta1=0.9, momentum_decay=4e-3))
    assert columns["mu_product"] == pytest.approx(float(opt.state[next(model.parameters())]["mu_product"]))
    assert columns["mu_product_consistent"] is True
    # Resetting step but not mu_product leaves the schedule inconsistent: say so.
    state = opt.state_dict()
    for entry in state["state"].values():
        entry["step"] = torch.tensor(1.0)
    reset = saved_and_loaded(tmp_path, model, opt, state_dict=state)
    assert get_family("nadam").columns(reset.params[0], reset.groups[0])["mu_product_consistent"] is False


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: O.Adamax(ps, lr=2e-3),
        lambda ps: O.NAdam(ps, lr=2e-3),
        lambda ps: O.RAdam(ps, lr=1e-3),
        lambda ps: O.RAdam(ps, lr=1e-3, betas=(0.9, 0.9)),
        lambda ps: O.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True),
    ],
    ids=["adamax", "nadam", "radam-unrectified", "radam-rectified", "rmsprop-momentum"],
)
def test_update_quantity_is_the_next_step_with_a_zero_gradient(tmp_path, make):
    assert max(update_quantity_errors(tmp_path, make, steps=4)) <= 1e-5


# ------------------------------------------------------------------------ torch Adafactor
def test_adafactor_reconstructed_variance_and_relative_effective_lr(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = O.Adafactor(model.parameters(), lr=0.01)
    train(model, opt, steps=3)
    loaded = saved_and_loaded(tmp_path, model, opt)
    weight = model.hidden.weight
    param = loaded.param("hidden.weight")
    assert param.shape == (8, 8)
    state = opt.state[weight]
    eps1 = torch.finfo(torch.float32).eps
    variance = state["row_var"] @ state["col_var"] / state["row_var"].mean(dim=-2, keepdim=True).clamp(min=eps1)
    eta = ostate.effective_lr(param, loaded.groups[0])
    torch.testing.assert_close(eta, min(0.01, 1 / 4**0.5) / variance.sqrt().clamp(min=eps1), rtol=1e-6, atol=0)
    table = ostate.analyze(loaded)
    row = table.set_index("name").loc["hidden.weight"]
    assert row["variance_mean"] == pytest.approx(float(variance.mean()), rel=1e-5)
    assert bool(row["factored"]) is True


# ------------------------------------------------------------------------------ LBFGS
def test_lbfgs_is_summarised_without_crashing_and_says_what_cannot_be_computed(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = O.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=3)
    lbfgs_train(model, opt, steps=3)
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert (loaded.kind, loaded.kind_source) == ("lbfgs", "detected")
    first = loaded.params[0]
    assert first.name == "inp.weight" and first.shape == (8, 4)
    table = ostate.analyze(loaded)
    row = table.iloc[0]
    state = opt.state[next(model.parameters())]
    assert row["n_iter"] == state["n_iter"] and row["func_evals"] == state["func_evals"]
    assert row["history"] == len(state["old_dirs"]) <= 3
    assert row["flat_numel"] == sum(p.numel() for p in model.parameters())
    assert row["grad_norm"] == pytest.approx(float(state["prev_flat_grad"].double().norm()))
    with pytest.raises(ostate.OstateError, match="cannot be computed"):
        ostate.next_update(first, loaded.groups[0], torch.zeros(8, 4), torch.zeros(8, 4))
    with pytest.raises(ostate.OstateError, match="no effective learning rate"):
        ostate.effective_lr(first, loaded.groups[0])


def test_adafactor_oracle_cases_exercise_update_clipping(tmp_path):
    # The 'adafactor' case after one step: some parameter's RMS(U) exceeds d = 1, so the
    # prediction above matched torch with clipping active, not only without it.
    from ostate.optimizers.adafactor import weight_scale

    torch.manual_seed(0)
    model = Net()
    opt = O.Adafactor(model.parameters(), lr=0.01)
    train(model, opt, steps=1)
    set_next_gradient(model)
    eps1 = torch.finfo(torch.float32).eps
    rms_of_update = []
    for p in model.parameters():
        state, g = opt.state[p], p.grad
        w = 2.0**-0.8  # (t+1)^beta2_decay at t+1 = 2
        if g.dim() > 1:
            row = state["row_var"].lerp(g.norm(dim=-1, keepdim=True).square() / g.size(-1), w)
            col = state["col_var"].lerp(g.norm(dim=-2, keepdim=True).square() / g.size(-2), w)
            v = row @ col / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
        else:
            v = state["variance"].lerp(g * g, w)
        u = g * v.clamp(min=eps1 * eps1).rsqrt()
        rms_of_update.append(float(u.norm() / u.numel() ** 0.5))
    assert max(rms_of_update) > 1.0 > min(rms_of_update)
    weight = model.hidden.weight.detach()
    assert weight_scale(weight, opt.param_groups[0]) == pytest.approx(
        max(1e-3, float(weight.norm() / weight.numel() ** 0.5))
    )
