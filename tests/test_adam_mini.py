"""Adam-mini (adam-mini 1.1), against the real library's next step.

A tiny attention-and-MLP model whose names make Adam-mini use every kind of block: one
v per head (q_proj, k_proj), per row (embedding, v_proj, o_proj, mlp, lm_head), per
tensor (the norm) and per coordinate (biases).
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import nn

import ostate
from ostate.optimizers.adam_mini import block_effective_lr
from tests.helpers.oracle import TOLERANCE, actual_step, relative_error, saved_and_loaded

adam_mini = pytest.importorskip("adam_mini")

DIM, HEADS, KV_HEADS = 8, 4, 2


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, DIM)
        self.q_proj = nn.Linear(DIM, DIM, bias=False)
        self.k_proj = nn.Linear(DIM, DIM * KV_HEADS // HEADS, bias=False)
        self.v_proj = nn.Linear(DIM, DIM * KV_HEADS // HEADS)
        self.o_proj = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.mlp = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, 11, bias=False)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        k, v = k.repeat(1, 1, HEADS // KV_HEADS), v.repeat(1, 1, HEADS // KV_HEADS)
        a = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
        h = self.norm(h + self.o_proj(a))
        return self.lm_head(h + self.mlp(h))


def batch(seed):
    return torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(seed))


def trained(steps=3, **kwargs):
    torch.manual_seed(0)
    model = Tiny()
    with contextlib.redirect_stdout(io.StringIO()):  # Adam-mini prints its block choices
        opt = adam_mini.Adam_mini(model.named_parameters(), dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, **kwargs)
        for s in range(steps):
            opt.zero_grad()
            model(batch(s)).logsumexp(-1).mean().backward()
            opt.step()
    return model, opt


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("kwargs", [dict(lr=1e-2), dict(lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99))])
def test_next_update_matches_the_real_step(tmp_path, steps, kwargs):
    model, opt = trained(steps, **kwargs)
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert (loaded.kind, loaded.kind_source) == ("adam_mini", "detected")
    opt.zero_grad()
    model(batch(99)).logsumexp(-1).mean().backward()
    predicted = [
        ostate.next_update(p, loaded.groups[p.group], w.grad.clone(), w.detach().clone())
        for p, w in zip(loaded.params, model.parameters())
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        actual = actual_step(model, opt.step)
    for ours, theirs in zip(predicted, actual):
        assert relative_error(ours, theirs) <= TOLERANCE


def test_blocks_effective_lr_and_names(tmp_path):
    model, opt = trained(3, lr=1e-2)
    loaded = saved_and_loaded(tmp_path, model, opt)
    by_name = {p.name: p for p in loaded.params}
    table = ostate.analyze(loaded).set_index("name")
    kinds = {
        "q_proj.weight": ("head", HEADS),
        "k_proj.weight": ("head", KV_HEADS),
        "embed.weight": ("neuron", 11),
        "v_proj.weight": ("neuron", DIM * KV_HEADS // HEADS),
        "norm.weight": ("tensor", 1),
        "v_proj.bias": ("coordinate", DIM * KV_HEADS // HEADS),
    }
    for name, (kind, blocks) in kinds.items():
        assert (table.loc[name, "block_kind"], table.loc[name, "blocks"]) == (kind, blocks), name
    q = by_name["q_proj.weight"]
    state = opt.state[model.q_proj.weight]
    eff = 1e-2 / (state["vmean"].sqrt() / (1 - 0.999**3) ** 0.5 + 1e-8)  # one lr per head
    blocks = block_effective_lr(q, loaded.groups[q.group])
    assert [name for name, _ in blocks] == [f"q_proj.weight[head {i}]" for i in range(HEADS)]
    assert [lr for _, lr in blocks] == pytest.approx(eff.reshape(-1).tolist(), rel=1e-6)
    assert table.loc["q_proj.weight", "eff_lr_max"] == pytest.approx(float(eff.max()), rel=1e-5)
    assert block_effective_lr(by_name["norm.weight"], loaded.groups[0])[0][0] == "norm.weight"


def test_strategies_reset_the_block_moments_and_refuse_keep_v(tmp_path):
    from ostate.reset.strategies import apply_strategy

    model, opt = trained(3, lr=1e-2)
    sd = opt.state_dict()
    new = apply_strategy(sd, "reset-v", kind="adam_mini")
    for i, s in new["state"].items():
        key = "v" if "v" in s else "vmean"
        assert float(s[key].abs().sum()) == 0 and torch.equal(s["m"], sd["state"][i]["m"])
    opt.load_state_dict(new)
    with pytest.raises(ostate.OstateError, match="betas"):
        apply_strategy(sd, "keep-v", kind="adam_mini")
