"""CAME (came-pytorch 0.1), against the real library's next step."""

from __future__ import annotations

import pytest
import torch

import ostate
from tests.helpers.common import Net, train
from tests.helpers.oracle import TOLERANCE, check_next_update, saved_and_loaded, update_quantity_errors

came_pytorch = pytest.importorskip("came_pytorch")

CASES = {
    "defaults": lambda ps: came_pytorch.CAME(ps, lr=2e-4),
    "decay-clip": lambda ps: came_pytorch.CAME(
        ps, lr=1e-3, weight_decay=0.01, clip_threshold=0.5, betas=(0.8, 0.99, 0.999), eps=(1e-30, 1e-12)
    ),
}


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_next_update_matches_the_real_step(tmp_path, case, steps):
    check_next_update(tmp_path, CASES[case], steps, kind="came")


def test_update_quantity_is_the_real_step_with_a_zero_gradient(tmp_path):
    assert max(update_quantity_errors(tmp_path, CASES["defaults"], steps=4)) <= TOLERANCE


def test_effective_lr_divides_by_both_factored_statistics(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = CASES["defaults"](model.parameters())
    train(model, opt, steps=4)
    loaded = saved_and_loaded(tmp_path, model, opt)
    state = opt.state[model.hidden.weight]

    def rec(row, col):
        return (row / row.mean()).unsqueeze(-1) * col.unsqueeze(0)

    v = rec(state["exp_avg_sq_row"], state["exp_avg_sq_col"])
    s = rec(state["exp_avg_res_row"], state["exp_avg_res_col"])
    param = loaded.param("hidden.weight")
    torch.testing.assert_close(ostate.effective_lr(param, loaded.groups[0]), 2e-4 / (v.sqrt() * s.sqrt()))
    table = ostate.analyze(loaded).set_index("name")
    assert table.loc["hidden.weight", "instability_mean"] == pytest.approx(float(s.mean()), rel=1e-5)
    assert bool(table.loc["hidden.weight", "factored"]) and not bool(table.loc["hidden.bias", "factored"])
