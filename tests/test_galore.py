"""GaLore AdamW (galore-torch 1.0), against the real library's next step.

GaLore pickles a projector object into the state; ostate reads it without galore-torch's
code (no trust_pickle). The next update is compared with GaLore's step both between and
at a refresh of the projection (a new SVD of the gradient), for each projection side.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ostate
from tests.helpers.oracle import TOLERANCE, actual_step, relative_error, saved_and_loaded

galore_torch = pytest.importorskip("galore_torch")


class Mlp(nn.Module):
    """A wide (projected from the left) and a tall (from the right) matrix, and biases (plain AdamW)."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(16, 6)  # weight 6 x 16: m < n
        self.tall = nn.Linear(6, 12)  # weight 12 x 6: m >= n

    def forward(self, x):
        return self.tall(torch.tanh(self.wide(x)))


def batch(seed):
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))


def trained(steps, proj_type="std", gap=3, weight_decay=0.0, correct_bias=True):
    torch.manual_seed(0)
    model = Mlp().double()
    matrices = [model.wide.weight, model.tall.weight]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = galore_torch.GaLoreAdamW(
            [
                {"params": matrices, "rank": 3, "update_proj_gap": gap, "scale": 0.5, "proj_type": proj_type},
                {"params": [model.wide.bias, model.tall.bias]},
            ],
            lr=1e-2,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
        )
    for s in range(steps):
        opt.zero_grad()
        model(batch(s).double()).square().mean().backward()
        opt.step()
    return model, opt


def compare(tmp_path, model, opt):
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert (loaded.kind, loaded.kind_source) == ("galore_adamw", "detected")
    opt.zero_grad()
    model(batch(99).double()).square().mean().backward()
    by_name = {p.name: p for p in loaded.params}
    names = [n for n, _ in model.named_parameters()]
    predicted = {
        # kind=: an unprojected parameter's own keys alone look like Adam's; the optimizer is GaLore
        n: ostate.next_update(
            by_name[n], loaded.groups[by_name[n].group], w.grad.clone(), w.detach().clone(), kind=loaded.kind
        )
        for n, w in model.named_parameters()
    }
    actual = dict(zip(names, actual_step(model, opt.step)))
    for n in names:
        assert relative_error(predicted[n], actual[n]) <= TOLERANCE, n
    return loaded


@pytest.mark.parametrize("steps", [2, 3], ids=["saved-projection", "refreshed-projection"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "right", "left"])
def test_next_update_matches_the_real_step(tmp_path, steps, proj_type):
    model, opt = trained(steps, proj_type=proj_type, weight_decay=0.01)
    loaded = compare(tmp_path, model, opt)
    table = ostate.analyze(loaded).set_index("name")
    assert bool(table.loc["tall.weight", "projection_refresh_next"]) is (steps == 3)


def test_without_bias_correction(tmp_path):
    compare(tmp_path, *trained(4, correct_bias=False))


def test_effective_lr_is_the_diagonal_of_the_map_from_moment_to_step(tmp_path):
    model, opt = trained(2)
    loaded = saved_and_loaded(tmp_path, model, opt)
    tall = next(p for p in loaded.params if p.name == "tall.weight")
    assert tall.shape == (12, 6)
    eff = ostate.effective_lr(tall, loaded.groups[tall.group])
    # Build the map column by column: a unit bias-corrected moment in coordinate (i, j) is projected,
    # preconditioned by 1/(sqrt v + eps) and projected back, times lr * sqrt(1 - beta2^t) * scale.
    state = opt.state[model.tall.weight]
    b, v = state["projector"].ortho_matrix, state["exp_avg_sq"]
    diagonal = torch.empty(12, 6, dtype=torch.float64)
    for i in range(12):
        for j in range(6):
            unit = torch.zeros(12, 6, dtype=torch.float64)
            unit[i, j] = 1.0
            step = ((unit @ b.t()) / (v.sqrt() + 1e-6)) @ b * 0.5 * 1e-2 * (1 - 0.999**2) ** 0.5
            diagonal[i, j] = step[i, j]
    torch.testing.assert_close(eff.double(), diagonal, rtol=1e-6, atol=0)
