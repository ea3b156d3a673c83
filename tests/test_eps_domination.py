"""eps domination for every adaptive family, computed by ostate and recomputed here from each family's formula.

Each optimizer is the real one (torch, schedule-free, bitsandbytes), trained a few steps
with an eps large enough that some coordinates, but not all, are dominated by it; the
expected fraction is recomputed from the raw saved state with the family's own
denominator (eps outside the bias-corrected root for NAdam, on the uncorrected root
for RAdam and SparseAdam, and so on).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import ostate
from tests.helpers.common import Net, train
from tests.helpers.families import Big, Embedder

# Every test here runs with the compiled loops and with the torch ops (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("arithmetic")

EPS = 3e-3


def _bnb(name, **kwargs):
    def make(params):
        bnb = pytest.importorskip("bitsandbytes")
        return getattr(bnb.optim, name)(params, **kwargs)

    return make


def _schedulefree(params):
    schedulefree = pytest.importorskip("schedulefree")
    opt = schedulefree.AdamWScheduleFree(params, lr=2e-3, warmup_steps=5, eps=EPS)
    opt.train()
    return opt


def _dequantized_state(state, index):
    from ostate.optimizers.bnb8bit import dequantize_blockwise

    nested = state.get("__bnb_optimizer_quant_state__", state)
    codes = state[f"state{index}"] if f"state{index}" in state else nested[f"state{index}"]
    if codes.dtype != torch.uint8:
        return codes.float()
    return dequantize_blockwise(codes, nested[f"qmap{index}"], nested[f"absmax{index}"])


def _root_over_bc2(v, beta2, step):
    return (v.float() / (1 - beta2**step)).sqrt()


# family -> (model, optimizer factory, sqrt(s_hat) of one parameter's saved state and group)
CASES = {
    "nadam": (
        Net,
        lambda ps: torch.optim.NAdam(ps, eps=EPS),
        lambda s, g: _root_over_bc2(s["exp_avg_sq"], g["betas"][1], float(s["step"])),
    ),
    "radam": (Net, lambda ps: torch.optim.RAdam(ps, eps=EPS), lambda s, g: s["exp_avg_sq"].sqrt()),
    "sparse_adam": (Embedder, lambda ps: torch.optim.SparseAdam(ps, eps=EPS), lambda s, g: s["exp_avg_sq"].sqrt()),
    "adagrad": (Net, lambda ps: torch.optim.Adagrad(ps, eps=EPS * 10), lambda s, g: s["sum"].sqrt()),
    "rmsprop": (
        Net,
        lambda ps: torch.optim.RMSprop(ps, eps=EPS, centered=True),
        lambda s, g: (s["square_avg"] - s["grad_avg"] ** 2).sqrt(),
    ),
    "schedulefree_adamw": (Net, _schedulefree, lambda s, g: _root_over_bc2(s["exp_avg_sq"], g["betas"][1], g["k"])),
    "bnb_adam": (
        Big,
        _bnb("AdamW8bit", lr=1e-3, eps=EPS),
        lambda s, g: _root_over_bc2(_dequantized_state(s, 2), g["betas"][1], s["step"]),
    ),
    "bnb_rmsprop": (Big, _bnb("RMSprop8bit", lr=1e-3, eps=EPS), lambda s, g: _dequantized_state(s, 1).sqrt()),
    "bnb_adagrad": (Big, _bnb("Adagrad8bit", lr=0.01, eps=EPS * 10), lambda s, g: _dequantized_state(s, 1).sqrt()),
}
# Families whose numerator is the gradient: no Adam-mini compressibility can be computed from the state.
GRADIENT_NUMERATOR = {"adagrad", "rmsprop", "schedulefree_adamw", "bnb_rmsprop", "bnb_adagrad"}


@pytest.mark.parametrize("kind", CASES)
def test_eps_dominated_fraction_follows_each_familys_own_denominator(kind, tmp_path):
    make_model, make_opt, root = CASES[kind]
    torch.manual_seed(0)
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_opt(model.parameters())
        train(model, opt, steps=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    ckpt = ostate.load(path)
    assert ckpt.optimizers[0].kind == kind
    table = ostate.analyze(ckpt).set_index("name")

    saved = opt.state_dict()
    group = saved["param_groups"][0]
    eps = group["eps"]
    names = [n for n, _ in model.named_parameters()]
    dominated = total = 0
    for index, name in enumerate(names):
        state = saved["state"].get(index)
        if not state:
            continue
        expected = root(state, group) <= eps
        dominated += int(expected.sum())
        total += expected.numel()
        assert table.loc[name, "eps_dominated_frac"] == pytest.approx(float(expected.double().mean()), abs=1e-9), name
    # The case is informative: eps dominates some coordinates but not all.
    assert 0 < dominated < total
    if kind in GRADIENT_NUMERATOR:
        assert "vmean_tensor_relchange" not in table.columns or table["vmean_tensor_relchange"].isna().all()
    else:
        assert table["vmean_tensor_relchange"].notna().any()


@pytest.mark.parametrize("kind,key", [("rmsprop", "square_avg"), ("adagrad", "sum")])
def test_one_state_families_report_the_8bit_error_of_what_bitsandbytes_would_quantise(kind, key, tmp_path):
    make_model, make_opt, _root = CASES[kind]
    torch.manual_seed(0)
    model = make_model()
    opt = make_opt(model.parameters())
    train(model, opt, steps=3)
    table = ostate.analyze(ostate.from_state_dict(opt.state_dict(), model=model)).set_index("name")
    errors = table[f"{key}_q8_relerr"]
    assert errors.notna().all() and (errors > 0).all() and (errors < 0.05).all()
    assert not math.isnan(float(errors.max()))
