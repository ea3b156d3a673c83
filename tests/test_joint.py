"""The joint (sqrt(v_hat), |m_hat|) histogram: exact counts per cell, merging, and only when asked for."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import ostate
from ostate.analysis import summarize
from ostate.analysis.joint import AXIS_BINS, JointHistogram, axis_ids, bin_edges
from tests.helpers.common import Net, train


def _adam_checkpoint(amsgrad: bool = False):
    torch.manual_seed(0)
    model = Net(width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=amsgrad)
    train(model, opt, steps=5)
    return ostate.from_state_dict(opt.state_dict(), model=model), opt


def _brute_force_cells(x: torch.Tensor, y: torch.Tensor) -> dict[int, int]:
    """Cell counts computed one value at a time from the float32 bit patterns."""
    out: dict[int, int] = {}
    for a, b in zip(x.float().tolist(), y.float().tolist()):
        ia = (np.float32(abs(a)).view(np.uint32) >> 21) & 0x3FF
        ib = (np.float32(abs(b)).view(np.uint32) >> 21) & 0x3FF
        key = int(ia) * AXIS_BINS + int(ib)
        out[key] = out.get(key, 0) + 1
    return out


def test_cells_count_every_pair_exactly_like_the_bit_patterns_say():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=g).exp()
    y = torch.randn(5000, generator=g).mul(3).exp() * 1e-3
    h = JointHistogram()
    h.add(x[:3000], y[:3000])  # two chunks, as the analysis adds them
    h.add(x[3000:], y[3000:])
    xs, ys, counts = h.cells
    got = {int(a) * AXIS_BINS + int(b): int(c) for a, b, c in zip(xs, ys, counts)}
    assert got == _brute_force_cells(x, y)
    assert h.total == 5000 and h.nonfinite == 0


def test_a_value_lies_inside_its_bin_and_bins_are_at_most_a_quarter_wide():
    values = torch.tensor([1e-30, 3.7e-8, 0.001, 1.0, 1.24, 1.25, 7.9, 6.5e4], dtype=torch.float32)
    lower, upper = bin_edges(axis_ids(values).numpy())
    assert np.all(lower <= values.double().numpy()) and np.all(values.double().numpy() < upper)
    assert np.all(upper / lower <= 1.25 + 1e-12)


def test_zeros_and_nonfinite_are_counted_apart_from_the_drawn_cells():
    h = JointHistogram()
    h.add(
        torch.tensor([0.0, 1.0, 2.0, float("nan"), 1.0, float("inf")]),
        torch.tensor([0.0, 0.0, 0.5, 1.0, float("nan"), 0.1]),
    )
    x_edges, y_edges, counts = h.grid()
    assert h.total == 6 and h.nonfinite == 3
    assert h.zero_x == 1 and h.zero_y_only == 1
    assert counts.sum() == 1 and h.counted == 3


def test_merging_in_any_order_gives_the_same_histogram():
    g = torch.Generator().manual_seed(2)
    parts = []
    for _ in range(4):
        h = JointHistogram()
        h.add(torch.rand(1000, generator=g) * 10, torch.rand(1000, generator=g))
        parts.append(h)
    one = JointHistogram.merged(parts)
    other = JointHistogram().merge(parts[3]).merge(parts[1]).merge(parts[0]).merge(parts[2])
    assert one.total == other.total == 4000
    for a, b in zip(one.cells, other.cells):
        assert np.array_equal(a, b)
    back = JointHistogram.from_dict(one.to_dict())
    assert np.array_equal(back.cells[2], one.cells[2]) and back.total == one.total


@pytest.mark.parametrize("amsgrad", [False, True])
def test_summarize_joint_counts_the_bias_corrected_moments_of_every_coordinate(amsgrad):
    checkpoint, opt = _adam_checkpoint(amsgrad)
    optimizer = checkpoint.optimizers[0]
    analysis = summarize(checkpoint, joint=True)
    model_row = analysis.rows("model")[0]
    joint = model_row.joints["moments"]
    assert joint.total == sum(p.numel for p in optimizer.params if p.has_state)
    beta1, beta2 = opt.param_groups[0]["betas"]
    xs, ys = [], []
    for _param, state in zip(optimizer.params, opt.state_dict()["state"].values()):
        t = float(state["step"])
        # The EMA v, not AMSGrad's running maximum: the reference lines are about the averages.
        xs.append((state["exp_avg_sq"] / (1 - beta2**t)).sqrt().reshape(-1))
        ys.append((state["exp_avg"].abs() / (1 - beta1**t)).reshape(-1))
    expected = _brute_force_cells(torch.cat(xs), torch.cat(ys))
    cx, cy, counts = joint.cells
    got = {int(a) * AXIS_BINS + int(b): int(c) for a, b, c in zip(cx, cy, counts)}
    # float32 arithmetic in a different order may move a value across a bin edge: allow a handful.
    moved = sum(abs(got.get(k, 0) - expected.get(k, 0)) for k in set(got) | set(expected))
    assert moved <= 4, moved


def test_joint_is_off_by_default_and_changes_no_table_value():
    checkpoint, _opt = _adam_checkpoint()
    plain = summarize(checkpoint)
    assert all(not row.joints for row in plain.rows("param"))
    with_joint = summarize(checkpoint, joint=True)
    for by in ("param", "layer", "model"):
        pd.testing.assert_frame_equal(plain.table(by), with_joint.table(by))


def test_families_without_both_moments_get_no_joint_histogram():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt)
    analysis = summarize(ostate.from_state_dict(opt.state_dict(), model=model), joint=True)
    assert all(not row.joints for row in analysis.rows("param"))


def test_a_group_row_merges_its_parameters_joint_histograms():
    checkpoint, _opt = _adam_checkpoint()
    analysis = summarize(checkpoint, joint=True)
    params = analysis.rows("param")
    layer = analysis.rows("layer")[0]
    members = [r for r in params if r.key in layer.members]
    assert layer.joints["moments"].total == sum(r.joints["moments"].total for r in members)
    assert math.isclose(layer.joints["moments"].counted, sum(r.joints["moments"].counted for r in members))
