"""bitsandbytes 8-bit (and 32-bit) optimizer state, with bitsandbytes itself as the oracle.

bitsandbytes' optimizers run on CPU here, so the state is written by the real library:
``state_dict()`` of bitsandbytes >= 0.45 nests the quantisation tensors under
``__bnb_optimizer_quant_state__``; older releases saved them flat, which is what
``torch.optim.Optimizer.state_dict`` (the method they did not override) produces.
Layouts the installed release can no longer write (blocks of 2048, one scale per
tensor with ``block_wise=False``) are built from bitsandbytes' own quantiser, as
bitsandbytes/optim/optimizer.py (``init_state`` of releases before 0.45) lays them out.
"""

from __future__ import annotations

import pytest
import torch

import ostate
from ostate.optimizers import get_family
from ostate.optimizers.bnb8bit import dequantize_blockwise, dequantized
from tests.helpers.common import train
from tests.helpers.families import Big
from tests.helpers.oracle import actual_step, assert_matches, predicted_updates, saved_and_loaded, set_next_gradient

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")


CASES = {
    "Adam8bit": ("bnb_adam", lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3)),
    "AdamW8bit": ("bnb_adam", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))),
    "PagedAdamW8bit": ("bnb_adam", lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-3)),
    "AdamW32bit": ("bnb_adam", lambda ps: bnb.optim.AdamW(ps, lr=1e-3, optim_bits=32)),
    "Lion8bit": ("bnb_lion", lambda ps: bnb.optim.Lion8bit(ps, lr=1e-4, weight_decay=0.1)),
    "SGD8bit": ("bnb_momentum", lambda ps: bnb.optim.SGD8bit(ps, lr=0.01, momentum=0.9, weight_decay=0.01)),
    "RMSprop8bit": ("bnb_rmsprop", lambda ps: bnb.optim.RMSprop8bit(ps, lr=1e-3, weight_decay=0.01)),
    "Adagrad8bit": ("bnb_adagrad", lambda ps: bnb.optim.Adagrad8bit(ps, lr=0.01)),
}


@pytest.fixture(autouse=True)
def _paged_optimizers_warn_on_cpu():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        yield


def trained(name: str, steps: int):
    torch.manual_seed(0)
    model = Big()  # one matrix big enough for 8-bit state (70 x 64 = 17.5 blocks of 256), the rest 32-bit
    opt = CASES[name][1](model.parameters())
    train(model, opt, steps=steps)
    return model, opt


def flat_layout(opt) -> dict:
    """The state dict as bitsandbytes < 0.45 saved it: quantisation tensors flat in each entry."""
    return torch.optim.Optimizer.state_dict(opt)


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("name", sorted(CASES))
def test_next_update_matches_bitsandbytes_next_step_from_either_layout(tmp_path, name, steps):
    kind = CASES[name][0]
    model, opt = trained(name, steps)
    nested, flat = opt.state_dict(), flat_layout(opt)
    assert "__bnb_optimizer_quant_state__" in nested["state"][2] and "state1" in flat["state"][2]
    set_next_gradient(model)
    predictions = []
    for state_dict in (nested, flat):
        loaded = saved_and_loaded(tmp_path, model, opt, state_dict=state_dict)
        assert loaded.kind == kind
        big = loaded.param("big.weight")
        assert big.shape == (64, 70)
        columns = get_family(kind).columns
        assert columns(big, loaded.groups[0])["state_bits"] == (32 if name == "AdamW32bit" else 8)
        assert columns(loaded.param("head.bias"), loaded.groups[0])["state_bits"] == 32
        predictions.append(predicted_updates(loaded, model))
    actual = actual_step(model, opt.step)
    for predicted in predictions:
        assert_matches(predicted, actual)


def test_lion_and_sgd_state_are_alike_so_the_choice_is_reported(tmp_path):
    # Both keep one state tensor and eps = 0; Lion's betas[1] is its beta2, SGD's is the (unused) dampening.
    model, opt = trained("Lion8bit", 1)
    loaded = saved_and_loaded(tmp_path, model, opt)
    assert (loaded.kind, loaded.kind_source) == ("bnb_lion", "assumed")
    assert any("bnb_momentum" in w for w in loaded.warnings)
    model, opt = trained("SGD8bit", 1)
    assert saved_and_loaded(tmp_path, model, opt).kind_source == "detected"


def test_dequantisation_matches_bitsandbytes_own_dequantiser(tmp_path):
    model, opt = trained("AdamW8bit", 3)
    loaded = saved_and_loaded(tmp_path, model, opt)
    big = loaded.param("big.weight")
    state = opt.state[model.big.weight]
    for index in (1, 2):
        theirs = F.dequantize_blockwise(
            state[f"state{index}"], absmax=state[f"absmax{index}"], code=state[f"qmap{index}"], blocksize=256
        )
        assert torch.equal(dequantized(big, index), theirs)
    # And element by element, the documented formula: qmap[code] * absmax[j // 256].
    codes, qmap, absmax = state["state2"].reshape(-1), state["qmap2"], state["absmax2"]
    for j in (0, 255, 256, 4479):
        assert float(dequantized(big, 2).reshape(-1)[j]) == float(qmap[codes[j].long()] * absmax[j // 256])


def test_effective_lr_and_moments_are_read_from_dequantised_state(tmp_path):
    model, opt = trained("AdamW8bit", 3)
    loaded = saved_and_loaded(tmp_path, model, opt)
    big = loaded.param("big.weight")
    v = dequantized(big, 2)
    expected = 1e-3 / (v.sqrt() / (1 - 0.95**3) ** 0.5 + 1e-8)
    torch.testing.assert_close(ostate.effective_lr(big, loaded.groups[0]), expected, rtol=1e-6, atol=0)
    row = ostate.analyze(loaded).set_index("name").loc["big.weight"]
    assert row["exp_avg_sq_mean"] == pytest.approx(float(v.mean()), rel=1e-5)
    assert row["exp_avg_abs_max"] == pytest.approx(float(dequantized(big, 1).abs().max()), rel=1e-6)
    assert row["blocksize"] == 256 and row["state_bits"] == 8
    assert 0 <= row["state2_zero_fraction"] <= 1


@pytest.mark.parametrize("blocksize", [2048, 256])
def test_older_blockwise_layouts_are_dequantised_with_their_block_size(tmp_path, blocksize):
    # bitsandbytes before 0.43 used blocks of 2048 (init_state: blocks = n // 2048 + ...), flat keys.
    torch.manual_seed(0)
    m, v = torch.randn(64, 70) * 1e-2, torch.rand(64, 70) * 1e-4
    signed, unsigned = F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False)
    q1, s1 = F.quantize_blockwise(m, code=signed, blocksize=blocksize)
    q2, s2 = F.quantize_blockwise(v, code=unsigned, blocksize=blocksize)
    entry = {
        "step": 10,
        "state1": q1,
        "qmap1": signed,
        "absmax1": s1.absmax,
        "state2": q2,
        "qmap2": unsigned,
        "absmax2": s2.absmax,
    }
    sd = {
        "state": {0: entry},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": [0]}],
    }
    path = tmp_path / "old.pt"
    torch.save({"optimizer": sd}, path)
    loaded = ostate.load(path).optimizers[0]
    assert loaded.kind == "bnb_adam"
    param = loaded.params[0]
    assert get_family("bnb_adam").columns(param, loaded.groups[0])["blocksize"] == blocksize
    assert torch.equal(dequantized(param, 1), F.dequantize_blockwise(q1, s1))
    assert torch.equal(dequantized(param, 2), F.dequantize_blockwise(q2, s2))


def test_non_blockwise_state_uses_its_single_scale(tmp_path):
    # block_wise=False (bitsandbytes < 0.45): one scale per tensor in max1, after the swap with new_max1.
    qmap = F.create_dynamic_map(signed=True)
    codes = torch.randint(0, 256, (64, 70), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    scale = torch.tensor([0.37])
    entry = {"step": 3, "state1": codes, "qmap1": qmap, "max1": scale, "new_max1": torch.tensor([0.1])}
    sd = {
        "state": {0: entry},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.99), "eps": 0.0, "weight_decay": 0.0, "params": [0]}],
    }
    loaded = ostate.from_state_dict(sd).optimizers[0]
    assert loaded.kind == "bnb_lion"
    expected = torch.tensor([float(qmap[c]) * 0.37 for c in codes.reshape(-1).tolist()]).reshape(64, 70)
    torch.testing.assert_close(dequantized(loaded.params[0], 1), expected, rtol=1e-6, atol=0)


def test_dequantize_blockwise_handles_a_partial_last_block():
    qmap = torch.linspace(-1, 1, 256)
    codes = torch.arange(300, dtype=torch.int64).remainder(256).to(torch.uint8)
    absmax = torch.tensor([2.0, 3.0])
    values = dequantize_blockwise(codes, qmap, absmax)
    assert values.shape == (300,)
    assert float(values[10]) == pytest.approx(float(qmap[10]) * 2.0)
    assert float(values[299]) == pytest.approx(float(qmap[299 - 256]) * 3.0)


def test_percentile_clipping_state_refuses_a_next_update_but_keeps_the_effective_lr(tmp_path):
    # Releases before 0.45 saved gnorm_vec (the last 100 gradient norms) when percentile_clipping < 100;
    # the percentile itself was an optimizer argument, not saved.
    model, opt = trained("Adam8bit", 1)
    sd = flat_layout(opt)
    for entry in sd["state"].values():
        entry["gnorm_vec"] = torch.zeros(100)
    loaded = saved_and_loaded(tmp_path, model, opt, state_dict=sd)
    big = loaded.param("big.weight")
    assert ostate.effective_lr(big, loaded.groups[0]).shape == (64, 70)
    with pytest.raises(ostate.OstateError, match="percentile clipping"):
        ostate.next_update(big, loaded.groups[0], torch.zeros(64, 70), model.big.weight.detach())
