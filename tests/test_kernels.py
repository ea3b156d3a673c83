"""The compiled loops (ostate/analysis/native/_kernels.c) against the torch ops they replace and exact float64 sums.

Counts, zeros, non-finite values, extremes, histograms and the 8-bit codes must be the
same both ways; sums may differ by rounding only (float64 against float32 per chunk).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import ostate
from ostate.analysis.native import kernels, library
from ostate.analysis.quantize import BLOCK, BlockwiseError, dynamic_map
from ostate.analysis.sketch import Sketch
from tests.helpers.common import run_cli, run_cli_process
from tests.helpers.native import build_kernels, c_compiler


@pytest.fixture
def kernels_in_use(compiled_loops):
    if not kernels.available():
        pytest.skip(f"the compiled loops are not in use here ({compiled_loops.splitlines()[0]})")


needs_kernels = pytest.mark.usefixtures("kernels_in_use")


def test_the_compiled_loops_are_built_where_a_c_compiler_is(compiled_loops):
    """Built by pip install, or for the tests by setup.py (tests/conftest.py): either way in use."""
    if os.environ.get("OSTATE_KERNELS") == "0":
        pytest.skip("switched off by OSTATE_KERNELS=0")
    if c_compiler() is None:
        pytest.skip("no C compiler here: ostate uses the torch ops")
    assert kernels.available(), f"a C compiler is here, but the compiled loops are not in use: {compiled_loops}"


def test_setup_py_builds_the_loops_for_the_stable_abi(tmp_path):
    """What pip install builds: ``_kernels.abi3.so``, one file for every Python from 3.10, and usable."""
    pytest.importorskip("setuptools")
    if c_compiler() is None:
        pytest.skip("no C compiler here")
    build = build_kernels(tmp_path)
    assert build.path is not None, f"setup.py build_ext built nothing:\n{build.log}"
    if not sys.platform.startswith("win") and not sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert build.path.name == "_kernels.abi3.so"
    assert build.path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))  # kernels.py finds it
    lib = library.open_library(str(build.path))
    assert lib is not None and lib.ostate_kernels_abi() == library.ABI


def test_load_library_takes_only_a_build_of_this_c_file_and_not_when_switched_off(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_LIB", None)
    assert not kernels.load_library(tmp_path / "missing.so") and not kernels.available()
    other = importlib.util.find_spec("numpy._core._multiarray_umath") or importlib.util.find_spec(
        "numpy.core._multiarray_umath"
    )
    assert not kernels.load_library(other.origin) and not kernels.available()
    if c_compiler() is None:
        return
    build = build_kernels(tmp_path / "build")
    assert build.path is not None, build.log
    monkeypatch.setenv("OSTATE_KERNELS", "0")
    assert not kernels.load_library(build.path) and not kernels.available()
    monkeypatch.delenv("OSTATE_KERNELS")
    assert kernels.load_library(build.path) and kernels.available()


def test_the_version_says_whether_the_compiled_loops_are_in_use(monkeypatch):
    version = f"ostate {ostate.__version__} (compiled loops: "
    assert run_cli("--version").stdout == version + kernels.status() + ")\n"
    assert (kernels.status() == "active") == kernels.available()
    monkeypatch.delenv("OSTATE_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_LIB", None)
    monkeypatch.setattr(library.importlib.util, "find_spec", lambda name: None)
    assert run_cli("--version").stdout == version + "not built, using torch ops)\n"
    switched_off = run_cli_process("--version", env={"OSTATE_KERNELS": "0"})
    assert switched_off.returncode == 0
    assert switched_off.stdout == version + "off by OSTATE_KERNELS=0, using torch ops)\n"


def tricky(n: int, seed: int) -> torch.Tensor:
    """Normal values of many scales with ±0, subnormals, the largest floats, ±inf and NaN mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 20).clamp(max=1e30)
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan])
    where = torch.randint(0, n, (max(n // 50, 1),), generator=g)
    x[where] = specials[torch.randint(0, len(specials), (len(where),), generator=g)]
    return x


def both_ways(values: torch.Tensor, monkeypatch, *, with_histogram: bool = True) -> tuple[Sketch, Sketch]:
    compiled = Sketch(with_histogram=with_histogram)
    compiled.add(values)
    with monkeypatch.context() as m:
        m.setattr(kernels, "_LIB", None)
        reference = Sketch(with_histogram=with_histogram)
        reference.add(values)
    return compiled.compact(), reference.compact()


@needs_kernels
@pytest.mark.parametrize("n", [1, 7, 4096, 4097, 100_003])  # the sparse and the dense histogram, odd tails
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("finite", [True, False], ids=["finite", "with-inf-nan"])
def test_a_sketch_is_the_same_with_the_compiled_loop_and_with_torch(n, dtype, finite, monkeypatch):
    x = tricky(n, seed=n)
    if finite:
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    x = x.to(dtype)
    compiled, reference = both_ways(x, monkeypatch)
    for name in ("count", "zeros", "nan", "posinf", "neginf", "min", "max"):
        assert getattr(compiled, name) == getattr(reference, name), name
    np.testing.assert_array_equal(compiled.buckets, reference.buckets)
    np.testing.assert_array_equal(compiled.counts, reference.counts)
    finite_values = x.float().double()[torch.isfinite(x.float())]
    exact_total, exact_sumsq = float(finite_values.sum()), float(finite_values.square().sum())
    scale = float(finite_values.abs().sum())  # the error bound of a sum grows with the sum of magnitudes
    assert abs(compiled.total - exact_total) <= 1e-12 * scale + 1e-300
    assert compiled.sumsq == pytest.approx(exact_sumsq, rel=1e-12)
    assert abs(reference.total - exact_total) <= 1e-5 * scale + 1e-300
    assert reference.sumsq == pytest.approx(exact_sumsq, rel=1e-5)


@needs_kernels
def test_without_histogram_zeros_are_not_counted_apart_either_way(monkeypatch):
    x = torch.tensor([0.0, -0.0, 2.0, math.nan, -math.inf])
    compiled, reference = both_ways(x, monkeypatch, with_histogram=False)
    for s in (compiled, reference):
        assert (s.count, s.zeros, s.nan, s.neginf, s.total, s.min, s.max) == (3, 0, 1, 1, 2.0, -0.0, 2.0)


@needs_kernels
def test_rows_are_summed_as_their_own_calls_sum_them():
    rows = tricky(64 * 33, seed=3).view(64, 33)
    sums = kernels.row_sums(rows)
    for row, got in zip(rows, sums):
        one = kernels.SketchSums.empty()
        kernels.sketch_add(row, None, one)
        assert [getattr(got, f) for f, _ in got._fields_] == [getattr(one, f) for f, _ in one._fields_]


def brute_force_q8(x: torch.Tensor, signed: bool) -> tuple[float, float]:
    """Squared error and norm of the 8-bit round trip, by searching all 256 codes for each value (float64 sums)."""
    code = dynamic_map(signed).double()
    blocks = x.float().view(-1, BLOCK)
    absmax = blocks.abs().amax(1) if signed else blocks.amax(1)
    scale = absmax.masked_fill(absmax == 0, 1.0)
    y = (blocks / scale[:, None]).double()
    nearest = code[(y[..., None] - code).abs().argmin(-1)]
    weights = absmax.double().square()[:, None]
    return float(((y - nearest).square() * weights).sum()), float((y.square() * weights).sum())


@needs_kernels
@pytest.mark.parametrize("signed", [True, False], ids=["signed-m", "unsigned-v"])
def test_the_8bit_error_matches_the_torch_ops_and_a_brute_force_search(signed, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BLOCK * 40, generator=g) * torch.exp(torch.randn(BLOCK * 40, generator=g) * 3)
    x = x if signed else x.square()
    x[:BLOCK] = 0.0  # an all-zero block
    compiled = BlockwiseError(signed)
    compiled.add(x)
    with monkeypatch.context() as m:
        m.setattr(kernels, "_LIB", None)
        reference = BlockwiseError(signed)
        reference.add(x)
    error_sq, norm_sq = brute_force_q8(x, signed)
    # Each value's error is computed in float32 (as the torch ops do), the sums in float64.
    assert compiled.error_sq == pytest.approx(error_sq, rel=1e-6)
    assert compiled.norm_sq == pytest.approx(norm_sq, rel=1e-6)
    assert compiled.relative_error == pytest.approx(reference.relative_error, rel=1e-5)


@needs_kernels
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_block_holding_nan_or_inf_makes_the_8bit_error_nan(bad):
    x = torch.linspace(-1, 1, BLOCK * 3)
    x[BLOCK + 5] = bad
    acc = BlockwiseError(signed=True)
    acc.add(x)
    assert math.isnan(acc.relative_error)


@needs_kernels
def test_blocks_longer_than_bitsandbytes_block_are_refused():
    lo, hi = torch.zeros(1 << 16), torch.zeros(1 << 16)
    with pytest.raises(ValueError, match="at most 256"):
        kernels.q8_blocks(torch.zeros(2, 512), True, lo, hi, per_block=True)


@pytest.mark.parametrize("values", [[0.0, -0.0], [-0.0, 0.0], [-0.0, 0.0, math.nan], [-0.0]])
def test_a_zero_extreme_is_positive_zero_whichever_zero_comes_first(values, arithmetic):
    s = Sketch()
    s.add(torch.tensor(values))
    assert math.copysign(1.0, s.min) == math.copysign(1.0, s.max) == 1.0
    [row] = Sketch.of_rows(torch.tensor([values]))
    assert math.copysign(1.0, row.min) == math.copysign(1.0, row.max) == 1.0


def test_a_library_built_from_another_version_of_the_c_file_is_not_used(monkeypatch):
    monkeypatch.setattr(library, "ABI", library.ABI + 1)
    assert library.load() is None
    # A shared library without ostate's functions at all (a stale build from before one was added).
    other = importlib.util.find_spec("numpy._core._multiarray_umath") or importlib.util.find_spec(
        "numpy.core._multiarray_umath"
    )
    monkeypatch.setattr(library.importlib.util, "find_spec", lambda name: other)
    monkeypatch.setattr(library, "ABI", library.ABI - 1)
    assert library.load() is None


def test_the_c_file_refuses_to_build_under_fast_math(tmp_path):
    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        pytest.skip("no C compiler here")
    source = Path(kernels.__file__).with_name("_kernels.c")
    done = subprocess.run(
        [cc, "-O2", "-ffast-math", "-fsyntax-only", f"-I{sysconfig.get_paths()['include']}", str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "IEEE" in done.stderr
