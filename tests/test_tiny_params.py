"""Many tiny parameters are summarised together (ostate.analysis.tiny): every number must equal the one-parameter path's.

The checkpoints are written by real torch optimizers and saved with torch.save; the
state is then damaged the way real runs damage it (NaN, inf, exact zeros, moments too
small for float32 squares, bfloat16 moments), and the parameters differ in group,
step count and shape, so a batch that mixed any of them would show.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import ostate
import ostate.analysis.engine as engine
from ostate.analysis import summarize
from ostate.analysis.sketch import Sketch, quantiles_of
from ostate.analysis.tiny import TINY
from ostate.analysis.views import VIEWS

# Every test here runs with the compiled loops and with the torch ops (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("arithmetic")


class Mixed(nn.Module):
    """Tiny vectors, tiny matrices, a scalar, and two tensors too large to batch."""

    def __init__(self):
        super().__init__()
        self.tiny = nn.ParameterList([nn.Parameter(torch.randn(4)) for _ in range(12)])
        self.mats = nn.ParameterList([nn.Parameter(torch.randn(4, 8)) for _ in range(6)])
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.edge = nn.Parameter(torch.randn(TINY))
        self.big = nn.Linear(64, 32)
        self.late = nn.ParameterList([nn.Parameter(torch.randn(3)) for _ in range(4)])

    def groups(self, **second) -> list[dict]:
        first = [*self.tiny[:6], *self.mats[:3], self.scale, self.big.weight]
        rest = [*self.tiny[6:], *self.mats[3:], self.edge, self.big.bias, *self.late]
        return [{"params": first}, {"params": rest, **second}]


def _train(make_optimizer, second_group: dict) -> tuple[Mixed, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Mixed()
    optimizer = make_optimizer(model.groups(**second_group))
    for step in range(4):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        for p in model.late[:step]:  # these stepped fewer times: other step counts in one group
            p.grad = None
        optimizer.step()
    return model, optimizer


def _damage(state: dict) -> None:
    """NaN, inf and zeros in some moments, underflowing squares in one, bfloat16 in others."""
    keys = sorted(state)
    for n, index in enumerate(keys):
        entry = state[index]
        tensors = [k for k, v in entry.items() if torch.is_tensor(v) and v.dim() > 0]
        if not tensors:
            continue
        key = tensors[n % len(tensors)]
        t = entry[key]
        if n % 7 == 1:
            t.view(-1)[0] = float("nan")
        elif n % 7 == 2:
            t.view(-1)[-1] = float("inf")
        elif n % 7 == 3:
            t.view(-1)[: max(1, t.numel() // 2)] = 0.0
        elif n % 7 == 4:
            t.mul_(2.0**-70)  # squares below float32's normal range: the rescaled sum
        elif n % 7 == 5:
            entry[key] = t.to(torch.bfloat16)
        elif n % 7 == 6:
            t.view(-1)[0] = -0.0


OPTIMIZERS = {
    "adamw": (lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1), {"lr": 3e-4, "amsgrad": True}),
    "adam": (lambda groups: torch.optim.Adam(groups, lr=1e-2), {"eps": 1e-3, "betas": (0.8, 0.95)}),
    "sgd": (lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9), {"lr": 0.01}),
    "rmsprop": (lambda groups: torch.optim.RMSprop(groups, lr=1e-2, momentum=0.5), {"alpha": 0.9}),
}


@pytest.fixture(params=sorted(OPTIMIZERS))
def mixed_checkpoint(request, tmp_path):
    make, second = OPTIMIZERS[request.param]
    model, optimizer = _train(make, second)
    state_dict = optimizer.state_dict()
    _damage(state_dict["state"])
    path = tmp_path / f"{request.param}.pt"
    torch.save({"model": model.state_dict(), "optimizer": state_dict}, path)
    return ostate.load(str(path))


def _one_by_one(monkeypatch, checkpoint, workers: int = 1):
    with monkeypatch.context() as m:
        m.setattr(engine, "batch_key", lambda *args: None)
        return summarize(checkpoint, workers=workers)


def _assert_same_tables(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    for column in want.columns:
        for a, b in zip(got[column], want[column]):
            same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
            assert same, f"{column}: {a!r} != {b!r}"


def test_batched_rows_equal_the_one_parameter_path_in_every_view(mixed_checkpoint, monkeypatch):
    calls = []
    real = engine.summarize_tiny
    monkeypatch.setattr(engine, "summarize_tiny", lambda *a: calls.append(len(a[1])) or real(*a))
    batched = summarize(mixed_checkpoint, workers=1)
    monkeypatch.setattr(engine, "summarize_tiny", real)
    assert sum(calls) >= 20 and max(calls) > 1  # the batched path did the tiny parameters, several at a time
    alone = _one_by_one(monkeypatch, mixed_checkpoint)
    for view in VIEWS:
        _assert_same_tables(batched.table(view), alone.table(view))
    for got, want in zip(batched.rows("param"), alone.rows("param")):
        assert list(got.sums) == list(want.sums) and _nan_equal(got.sums, want.sums)
        assert list(got.sketches) == list(want.sketches)
        for quantity, sketch in got.sketches.items():
            assert _nan_equal(sketch.to_dict(), want.sketches[quantity].to_dict()), quantity


def test_batched_rows_do_not_depend_on_the_number_of_workers(mixed_checkpoint):
    one, two = summarize(mixed_checkpoint, workers=1), summarize(mixed_checkpoint, workers=2)
    for view in ("param", "layer", "model"):
        _assert_same_tables(two.table(view), one.table(view))


def test_damage_reaches_the_batched_rows(mixed_checkpoint):
    """The fixtures must exercise the slow paths: NaN/inf counted, zeros counted, bf16 state read."""
    table = summarize(mixed_checkpoint, workers=1).table("param")
    tiny = table[table["numel"] <= TINY]
    assert (tiny["nonfinite_frac"] > 0).any()
    assert tiny["dtype"].str.contains("bfloat16").any()
    assert tiny["step"].nunique() > 1 or tiny["step"].isna().all()  # SGD keeps no step count


def test_batching_keeps_groups_and_steps_apart(monkeypatch):
    """Two tiny parameters with the same state but another lr or step must not share a batch's math."""
    torch.manual_seed(1)
    a, b, c = (nn.Parameter(torch.randn(4)) for _ in range(3))
    optimizer = torch.optim.Adam([{"params": [a, b]}, {"params": [c], "lr": 0.5}], lr=1e-3)
    for step in range(3):
        for p in (a, b, c):
            p.grad = torch.ones(4)
        if step == 2:
            b.grad = None
        optimizer.step()
    state = optimizer.state_dict()
    state["state"][1] = {k: v.clone() for k, v in state["state"][0].items()}
    state["state"][1]["step"] = torch.tensor(1.0)
    state["state"][2] = {k: v.clone() for k, v in state["state"][0].items()}
    table = summarize(ostate.from_state_dict(state), workers=1).table()
    lr = table["eff_lr_p50"].tolist()
    assert lr[0] != lr[1] and lr[0] != lr[2]
    _assert_same_tables(table, _one_by_one(monkeypatch, ostate.from_state_dict(state)).table())


def test_sketches_of_rows_equal_one_sketch_per_row():
    torch.manual_seed(2)
    rows = torch.randn(30, 7) * torch.logspace(-45, 30, 30)[:, None]
    rows[3, 2], rows[4, 0], rows[5] = float("nan"), -float("inf"), 0.0
    rows[6, :3] = -0.0
    for matrix in (rows, rows.to(torch.bfloat16), rows.double()):
        for histogram in (True, False):
            got = Sketch.of_rows(matrix, with_histogram=histogram)
            for row, sketch in zip(matrix, got):
                alone = Sketch(with_histogram=histogram)
                alone.add(row)
                assert sketch.to_dict() == alone.compact().to_dict() or _nan_equal(sketch.to_dict(), alone.to_dict())


def _nan_equal(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_quantiles_of_many_sketches_equal_each_sketchs_own():
    torch.manual_seed(3)
    sketches = []
    for n in (1, 2, 9, 300, 5000):
        s = Sketch()
        s.add(torch.randn(n).mul_(10.0 ** float(torch.randint(-6, 6, ()))).where(torch.rand(n) > 0.2, 0.0))
        sketches.append(s)
    sketches += [Sketch(), Sketch.merged(sketches[:3]), Sketch(with_histogram=False)]
    sketches[-1].add(torch.ones(3))
    qs = [0.0, 0.01, 0.25, 0.5, 0.99, 1.0]
    got = quantiles_of(sketches, qs)
    for sketch, row in zip(sketches, got):
        np.testing.assert_array_equal(row, sketch.quantiles(qs))
