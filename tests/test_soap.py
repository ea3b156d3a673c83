"""SOAP (pytorch-optimizer 4.1), against the real library's next step.

Its state holds the full eigenbases of Shampoo's preconditioner (Q) beside Adam's
moments; ostate's next update rotates with them exactly as SOAP does, and its effective
learning rate is the diagonal of the rotated preconditioner, built here column by column.
"""

from __future__ import annotations

import pytest
import torch

import ostate
from tests.helpers.common import Net, train
from tests.helpers.oracle import check_next_update, saved_and_loaded

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

CASES = {
    "defaults": lambda ps: pytorch_optimizer.SOAP(ps, lr=3e-3),
    "frequent-refresh-1d-decay": lambda ps: pytorch_optimizer.SOAP(
        ps, lr=1e-3, precondition_frequency=2, precondition_1d=True, weight_decay=0.1, betas=(0.9, 0.99)
    ),
    "normalized-no-bias-correction": lambda ps: pytorch_optimizer.SOAP(
        ps, lr=1e-3, normalize_gradient=True, correct_bias=False, max_precondition_dim=6
    ),
}


@pytest.mark.parametrize("steps", [2, 5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_next_update_matches_the_real_step(tmp_path, case, steps):
    check_next_update(tmp_path, CASES[case], steps, kind="soap", dtype=torch.float64)


def test_effective_lr_is_the_diagonal_of_the_rotated_preconditioner(tmp_path):
    torch.manual_seed(0)
    model = Net().double()
    opt = CASES["defaults"](model.parameters())
    train(model, opt, steps=4)
    loaded = saved_and_loaded(tmp_path, model, opt)
    param = loaded.param("hidden.weight")
    group = loaded.groups[0]
    eff = ostate.effective_lr(param, group)
    state = opt.state[model.hidden.weight]
    ql, qr = state["Q"]
    d = state["exp_avg_sq"].sqrt() + 1e-8
    scale = 3e-3 * (1 - 0.95 ** (group["step"] - 1)) ** 0.5
    diagonal = torch.empty(8, 8, dtype=torch.float64)
    for i in range(8):
        for j in range(8):
            unit = torch.zeros(8, 8, dtype=torch.float64)
            unit[i, j] = 1.0
            diagonal[i, j] = (ql @ ((ql.t() @ unit @ qr) / d) @ qr.t())[i, j] * scale
    torch.testing.assert_close(eff, diagonal, rtol=1e-9, atol=0)
    table = ostate.analyze(loaded).set_index("name")
    assert (
        table.loc["hidden.weight", "preconditioned_dims"] == 2 and table.loc["hidden.bias", "preconditioned_dims"] == 0
    )
