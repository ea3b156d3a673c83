"""Third-party optimizers people have in real checkpoints, against the real libraries' next step.

transformers' Adafactor, lion-pytorch's Lion and schedule-free AdamW run here as they
do for users: train, torch.save, load through ostate, compare ``next_update`` with the
library's own next ``step()``. bitsandbytes is in tests/test_bnb8bit.py.
"""

from __future__ import annotations

import pytest
import torch

import ostate
from ostate.optimizers import get_family
from tests.helpers.common import Net, train
from tests.helpers.oracle import (
    actual_step,
    assert_matches,
    check_next_update,
    predicted_updates,
    saved_and_loaded,
    set_next_gradient,
)

transformers_optimization = pytest.importorskip("transformers.optimization")
lion_pytorch = pytest.importorskip("lion_pytorch")
schedulefree = pytest.importorskip("schedulefree")

HFAdafactor = transformers_optimization.Adafactor

HF_CASES = {
    "relative-step": lambda ps: HFAdafactor(ps),
    "warmup-init": lambda ps: HFAdafactor(ps, warmup_init=True),
    "fixed-lr-beta1-decay": lambda ps: HFAdafactor(
        ps, lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.01
    ),
    "scaled-fixed-lr-clip": lambda ps: HFAdafactor(
        ps, lr=1e-2, relative_step=False, scale_parameter=True, clip_threshold=0.5, decay_rate=-0.5
    ),
}


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_transformers_adafactor_next_update_matches_the_real_step(tmp_path, case, steps):
    check_next_update(tmp_path, HF_CASES[case], steps, kind="hf_adafactor")


def test_transformers_adafactor_reconstructs_the_factored_second_moment(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = HFAdafactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=True)
    train(model, opt, steps=4)
    loaded = saved_and_loaded(tmp_path, model, opt)
    param = loaded.param("hidden.weight")
    assert param.shape == (8, 8) and param.step == 4.0
    state = opt.state[model.hidden.weight]
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    v_hat = (row / row.mean()).unsqueeze(-1) * col.unsqueeze(0)
    lr = 1e-2 * max(1e-3, float(state["RMS"]))
    torch.testing.assert_close(ostate.effective_lr(param, loaded.groups[0]), lr / v_hat.sqrt(), rtol=1e-6, atol=0)
    row_of_table = ostate.analyze(loaded).set_index("name").loc["hidden.weight"]
    assert row_of_table["exp_avg_sq_mean"] == pytest.approx(float(v_hat.mean()), rel=1e-5)
    assert row_of_table["next_lr"] == pytest.approx(lr)
    assert bool(row_of_table["factored"]) is True
    # A vector keeps its full second moment.
    assert loaded.param("hidden.bias").shape == (8,)


def test_transformers_adafactor_momentum_update_is_the_step_with_a_zero_gradient(tmp_path):
    torch.manual_seed(0)
    model = Net().double()
    opt = HFAdafactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)
    train(model, opt, steps=3)
    loaded = saved_and_loaded(tmp_path, model, opt)
    family = get_family("hf_adafactor")
    predicted = [family.quantities({}, loaded.groups[0], p)["update"] for p in loaded.params]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for ours, theirs in zip(predicted, actual_step(model, opt.step)):
        torch.testing.assert_close(ours.double(), theirs.reshape(-1), rtol=1e-6, atol=1e-15)


# ------------------------------------------------------------------------ lion-pytorch
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: lion_pytorch.Lion(ps, lr=1e-4),
        lambda ps: lion_pytorch.Lion(ps, lr=3e-4, betas=(0.95, 0.98), weight_decay=0.1),
    ],
    ids=["defaults", "betas-decay"],
)
def test_lion_next_update_matches_the_real_step(tmp_path, make, steps):
    check_next_update(tmp_path, make, steps, kind="lion")


def test_lion_effective_lr_is_lr_and_update_is_the_sign_of_momentum(tmp_path):
    torch.manual_seed(0)
    model = Net().double()  # the step is lr = 1e-4 exactly: float64 keeps weight differences exact enough
    opt = lion_pytorch.Lion(model.parameters(), lr=1e-4)
    train(model, opt, steps=3)
    loaded = saved_and_loaded(tmp_path, model, opt)
    param = loaded.params[0]
    assert torch.equal(ostate.effective_lr(param, loaded.groups[0]), torch.full((8, 4), 1e-4))
    update = get_family("lion").quantities({"exp_avg": param.read("exp_avg").reshape(-1)}, loaded.groups[0], param)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    taken = actual_step(model, opt.step)[0]
    torch.testing.assert_close(update["update"].double(), taken.reshape(-1), rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------- schedule-free AdamW, SGD, RAdam
def schedulefree_run(steps: int, optimizer: str = "AdamWScheduleFree", **kwargs):
    torch.manual_seed(0)
    model = Net()
    opt = getattr(schedulefree, optimizer)(model.parameters(), **kwargs)
    opt.train()
    train(model, opt, steps=steps)
    return model, opt


@pytest.mark.parametrize("saved_mode", ["train", "eval"])
@pytest.mark.parametrize("steps", [1, 6])
@pytest.mark.parametrize(
    "optimizer, kind, kwargs",
    [
        ("AdamWScheduleFree", "schedulefree_adamw", dict(lr=2e-3)),
        (
            "AdamWScheduleFree",
            "schedulefree_adamw",
            dict(lr=2e-3, warmup_steps=10, weight_decay=0.01, betas=(0.8, 0.99)),
        ),
        ("AdamWScheduleFree", "schedulefree_adamw", dict(lr=1e-3, r=1.0, weight_lr_power=1.0, foreach=False)),
        ("SGDScheduleFree", "schedulefree_sgd", dict(lr=0.05, warmup_steps=10, weight_decay=0.01)),
        ("SGDScheduleFree", "schedulefree_sgd", dict(lr=0.02, momentum=0.8, r=1.0, foreach=False)),
        # silent: steps 1-4 move nothing, 7 is rectified; without the silent phase steps 1-4 are SGD's
        ("RAdamScheduleFree", "schedulefree_radam", dict(lr=2e-3, weight_decay=0.01)),
        (
            "RAdamScheduleFree",
            "schedulefree_radam",
            dict(lr=2e-3, silent_sgd_phase=False, r=1.0, betas=(0.8, 0.99), foreach=False),
        ),
    ],
    ids=[
        "adamw-defaults",
        "adamw-warmup-decay",
        "adamw-polynomial-weights-single-tensor",
        "sgd-warmup-decay",
        "sgd-momentum-polynomial-single-tensor",
        "radam-silent-decay",
        "radam-sgd-phase-single-tensor",
    ],
)
def test_schedulefree_next_update_matches_the_real_step(tmp_path, optimizer, kind, kwargs, steps, saved_mode):
    model, opt = schedulefree_run(steps, optimizer, **kwargs)
    if saved_mode == "eval":
        opt.eval()  # the recommended way to save: the model holds x
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert (loaded.kind, loaded.kind_source) == (kind, "detected")
    assert loaded.groups[0]["train_mode"] is (saved_mode == "train")
    set_next_gradient(model)
    predicted = predicted_updates(loaded, model)

    def step():
        opt.train()
        opt.step()

    assert_matches(predicted, actual_step(model, step))


def test_schedulefree_effective_lr_uses_the_next_scheduled_lr_and_group_counter(tmp_path):
    model, opt = schedulefree_run(4, lr=2e-3, warmup_steps=10)
    loaded = saved_and_loaded(tmp_path, model, opt)
    group = loaded.groups[0]
    assert group["k"] == 4
    v = opt.state[next(model.parameters())]["exp_avg_sq"]
    expected = 2e-3 * 5 / 10 / ((v / (1 - 0.999**4)).sqrt() + 1e-8)
    torch.testing.assert_close(ostate.effective_lr(loaded.params[0], group), expected, rtol=1e-6, atol=0)
    columns = get_family("schedulefree_adamw").columns(loaded.params[0], group)
    assert columns["k"] == 4 and columns["scheduled_lr"] == pytest.approx(1e-3)


def test_schedulefree_sgd_effective_lr_is_the_next_scheduled_lr(tmp_path):
    model, opt = schedulefree_run(4, "SGDScheduleFree", lr=0.05, warmup_steps=10)
    loaded = saved_and_loaded(tmp_path, model, opt)
    group = loaded.groups[0]
    assert (loaded.kind, group["k"]) == ("schedulefree_sgd", 4)
    assert torch.equal(ostate.effective_lr(loaded.params[0], group), torch.full((8, 4), 0.05 * 5 / 10))


@pytest.mark.parametrize("steps, rectified", [(0, False), (3, False), (9, True)])
def test_schedulefree_radam_effective_lr_is_the_next_rectified_lr(tmp_path, steps, rectified):
    """Steps 1 (never stepped: the first-step hook) and 4 are in the silent phase (rho_t < 4 at beta2 0.999:
    rate 0, and the real step moves nothing); step 10 is rectified."""
    model, opt = schedulefree_run(steps, "RAdamScheduleFree", lr=2e-3)
    loaded = saved_and_loaded(tmp_path, model, opt)
    group = loaded.groups[0]
    eta = ostate.effective_lr(loaded.params[0], group, kind="schedulefree_radam")
    if steps == 0:
        assert loaded.kind == "schedulefree_radam" and not loaded.params[0].has_state
        set_next_gradient(model)
        predicted = predicted_updates(loaded, model)
        actual = actual_step(model, opt.step)
        assert all(bool((p == 0).all()) and bool((a == 0).all()) for p, a in zip(predicted, actual))
        assert opt.param_groups[0]["k"] == 1 and bool(opt.state[next(model.parameters())]["exp_avg_sq"].any())
    columns = get_family("schedulefree_radam").columns(loaded.params[0], group)
    assert columns["rectified"] is rectified
    if not rectified:
        assert torch.equal(eta, torch.zeros(8, 4)) and columns["scheduled_lr"] == 0.0
        return
    t, rho_inf = steps + 1, 2 / (1 - 0.999) - 1
    rho = rho_inf - 2 * t * 0.999**t / (1 - 0.999**t)
    rect = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
    v = opt.state[next(model.parameters())]["exp_avg_sq"]
    expected = 2e-3 * rect / ((v / (1 - 0.999**steps)).sqrt() + 1e-8)
    torch.testing.assert_close(eta, expected, rtol=1e-6, atol=0)
    assert columns["scheduled_lr"] == pytest.approx(2e-3 * rect)


class ConvNet(torch.nn.Module):
    """A 4-D convolution kernel: Adafactor factors its second moment over the last two dimensions."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)
        self.lin = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.lin(self.conv(x.reshape(-1, 1, 2, 2).repeat(1, 3, 2, 2)).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "kind,make",
    [
        ("adafactor", lambda ps: torch.optim.Adafactor(ps)),
        ("hf_adafactor", lambda ps: HFAdafactor(ps, lr=1e-2, relative_step=False)),
    ],
    ids=["torch", "transformers"],
)
def test_adafactor_factored_state_of_a_conv_kernel_matches_the_real_step(tmp_path, kind, make):
    loaded = check_next_update(tmp_path, make, 3, kind=kind, model=ConvNet())
    assert loaded.param("conv.weight").shape == (5, 3, 3, 3)
