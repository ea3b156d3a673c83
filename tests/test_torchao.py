"""torchao's low-bit AdamW (AdamW8bit, AdamW4bit, AdamWFp8) and Adam, against torchao itself.

torchao 0.18 runs these optimizers on CPU (each step is torch.compile'd, hence slow). Its
state is a tensor subclass that ostate reads without torchao's code: these tests save
real checkpoints, load them with ostate (no trust_pickle), and compare the dequantised
moments, the next update and the quantisation columns with torchao's own objects.
CPUOffloadOptimizer needs CUDA (it asserts so), so it is not tested here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import ostate
from ostate.optimizers import get_family
from tests.helpers.families import Wide
from tests.helpers.oracle import actual_step, saved_and_loaded, set_next_gradient

torchao_optim = pytest.importorskip("torchao.optim")

pytestmark = pytest.mark.slow  # torch.compile of every step


def trained(make, steps: int = 3):
    torch.manual_seed(0)
    model = Wide()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make(model.parameters())
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(16, 4, generator=g)).square().mean().backward()
            opt.step()
    return model, opt


CASES = {
    "AdamW8bit": (lambda ps: torchao_optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.1), "8bit", 256),
    "AdamW4bit": (lambda ps: torchao_optim.AdamW4bit(ps, lr=1e-3), "4bit", 128),
    "AdamWFp8": (lambda ps: torchao_optim.AdamWFp8(ps, lr=1e-3, betas=(0.8, 0.99)), "fp8", 256),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_is_read_without_torchao_code_and_dequantised_as_torchao_does(tmp_path, case):
    make, quant, blocksize = CASES[case]
    model, opt = trained(make)
    loaded = saved_and_loaded(tmp_path, model, opt)  # no trust_pickle: the stand-ins, not torchao's classes
    assert (loaded.kind, loaded.kind_source) == ("torchao_adamw", "assumed")
    big = loaded.param("big.weight")
    real = opt.state[model.big.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert type(real[key]).__module__.startswith("torchao")
        assert torch.equal(big.read(key), real[key].dequantize())
        assert big.state[f"{key}_quant"] == quant
    small = loaded.param("inp.weight")
    assert "exp_avg_quant" not in small.state and torch.equal(
        small.read("exp_avg"), opt.state[model.inp.weight]["exp_avg"]
    )
    table = ostate.analyze(loaded).set_index("name")
    assert table.loc["big.weight", "state_bits"] == quant and table.loc["big.weight", "blocksize"] == blocksize
    assert table.loc["inp.weight", "state_bits"] == "32bit"
    scale = real["exp_avg_sq"].scale
    assert table.loc["big.weight", "exp_avg_sq_block_spread"] == pytest.approx(float(scale.max() / scale.median()))
    v = real["exp_avg_sq"].dequantize()
    assert table.loc["big.weight", "exp_avg_sq_zero_fraction"] == pytest.approx(float((v == 0).float().mean()))


def check_next_update(tmp_path, make, kind=None):
    """ostate's next update against torchao's step, to float32 rounding of the weights: torch.compile fuses
    torchao's element-wise ops (contracting them into fused multiply-adds), so the new weights may differ from
    the same ops done one by one in their last bits; elsewhere the tolerance is the oracle's 1e-5."""
    model, opt = trained(make, steps=4)
    loaded = saved_and_loaded(tmp_path, model, opt, kind=kind)
    set_next_gradient(model)
    family = get_family(loaded.kind)
    predicted = [
        family.next_update(loaded.params[i], loaded.groups[0], p.grad.clone(), p.detach().clone())
        for i, p in enumerate(model.parameters())
    ]
    weights = [p.detach().clone() for p in model.parameters()]
    actual = actual_step(model, opt.step)
    for ours, theirs, w in zip(predicted, actual, weights):
        rounding = 4 * torch.finfo(torch.float32).eps * w.abs()
        assert bool(((ours - theirs).abs() <= rounding + 1e-5 * theirs.abs().max()).all())
    # The tolerance can fail: an update 10% off is far outside it.
    assert not bool(
        ((predicted[0] * 0.9 - actual[0]).abs() <= 4e-7 * weights[0].abs() + 1e-5 * actual[0].abs().max()).all()
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_next_update_matches_torchao_step(tmp_path, case):
    check_next_update(tmp_path, CASES[case][0])


def test_adam8bit_is_read_as_adam_when_named(tmp_path):
    check_next_update(tmp_path, lambda ps: torchao_optim.Adam8bit(ps, lr=1e-3, weight_decay=0.1), kind="torchao_adam")


def test_a_damaged_torchao_state_is_one_clear_error(tmp_path):
    from ostate.formats.files.torchao_state import dequantize

    with pytest.raises(ostate.OstateError, match="block scales"):
        dequantize("8bit", torch.zeros(10, dtype=torch.uint8), torch.ones(3), torch.zeros(256), (10,))


def test_reset_strategies_other_than_fresh_and_reload_are_refused(tmp_path):
    from ostate.reset.strategies import layout_of

    with pytest.raises(ostate.OstateError, match="no known state layout"):
        layout_of("torchao_adamw")
