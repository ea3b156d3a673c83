"""The 8-bit blockwise quantization error against a brute-force search and against bitsandbytes itself."""

from __future__ import annotations

import math

import pytest
import torch

from ostate.analysis.quantize import BLOCK, BlockwiseError, dynamic_map

# Every test here runs with the compiled loops and with the torch ops (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("arithmetic")


def brute_force_relative_error(x: torch.Tensor, code: torch.Tensor) -> float:
    """Every value against all 256 codes, in float64: the definition, written the slow way."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    blocks = torch.cat([flat, torch.zeros(pad)]).view(-1, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True)
    y = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    nearest = code.double()[(y.double().unsqueeze(-1) - code.double()).abs().argmin(-1)]
    error = ((y.double() - nearest) * absmax.double()).square().sum()
    return math.sqrt(float(error / flat.double().square().sum()))


def heavy_tailed(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4


@pytest.mark.parametrize("signed", [True, False], ids=["signed-m", "unsigned-v"])
def test_relative_error_equals_a_brute_force_nearest_code_search(signed):
    x = heavy_tailed(50_000 + 77, seed=1)  # a partial last block
    x = x if signed else x.square()
    x[1024:1280] = 0.0  # an all-zero block round-trips exactly
    acc = BlockwiseError(signed)
    acc.add(x)
    assert acc.relative_error == pytest.approx(brute_force_relative_error(x, dynamic_map(signed)), rel=1e-6)


def test_chunks_that_start_on_block_boundaries_add_up_to_the_whole_tensor():
    x = heavy_tailed(10 * BLOCK + 13, seed=2)
    whole, pieces = BlockwiseError(True), BlockwiseError(True)
    whole.add(x)
    for start in range(0, x.numel(), 3 * BLOCK):
        pieces.add(x[start : start + 3 * BLOCK])
    assert pieces.error_sq == pytest.approx(whole.error_sq, rel=1e-9)
    assert pieces.norm_sq == pytest.approx(whole.norm_sq, rel=1e-6)


def test_an_all_zero_tensor_has_no_error_and_nan_makes_the_figure_nan():
    zero = BlockwiseError(False)
    zero.add(torch.zeros(1000))
    assert zero.relative_error == 0.0
    bad = BlockwiseError(True)
    bad.add(torch.tensor([1.0, float("nan"), 2.0]))
    assert math.isnan(bad.relative_error)


def test_values_that_are_codes_times_the_block_maximum_round_trip_exactly():
    code = dynamic_map(True)
    x = code[code.abs() <= 1] * 3.0  # one block whose absmax is 3 (from the code 1.0)
    acc = BlockwiseError(True)
    acc.add(x)
    assert acc.error_sq == pytest.approx(0.0, abs=1e-12)


bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is in the dev extra")


@pytest.mark.parametrize("signed", [True, False])
def test_the_map_is_bitsandbytes_dynamic_map(signed):
    assert torch.equal(dynamic_map(signed), bnb.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False], ids=["signed-m", "unsigned-v"])
def test_agrees_with_a_bitsandbytes_round_trip(signed):
    """bitsandbytes' CPU kernel (csrc/cpu_ops.cpp, common.cpp) sets code[0] to -1 and finds codes with an
    approximate search that sends some values below ~2e-5 of their block maximum to a farther code; with
    the same map the two figures agree to a small fraction of a percent."""
    x = heavy_tailed(200_000, seed=3)
    x = x if signed else x.square()
    code = dynamic_map(signed).clone()
    code[0] = -1.0
    quantized, state = bnb.quantize_blockwise(x, code=code.clone(), blocksize=BLOCK)
    round_trip = bnb.dequantize_blockwise(quantized, state)
    theirs = math.sqrt(float((x - round_trip).double().square().sum() / x.double().square().sum()))
    ours = BlockwiseError(signed, code=code)
    ours.add(x)
    assert ours.relative_error == pytest.approx(theirs, rel=1e-3)
