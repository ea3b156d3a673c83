"""Fixtures shared by the tests; the helpers they use are in tests/helpers/."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.common import Net, train


@pytest.fixture(scope="session", autouse=True)
def compiled_loops(tmp_path_factory) -> str:
    """Where this session's compiled loops (ostate.analysis.native.kernels) come from, or why there are none.

    A checkout where ``pip install`` has not built them (a clean tree, the ``.so`` deleted)
    runs every test as an install would: with a C compiler here, ``_kernels.c`` is built into
    a temporary directory (tests/helpers/native.py) and loaded with ``kernels.load_library``.
    """
    from ostate.analysis.native import kernels
    from tests.helpers.native import build_kernels, c_compiler

    if kernels.available():
        return "installed"
    if os.environ.get("OSTATE_KERNELS") == "0":
        return "switched off by OSTATE_KERNELS=0"
    if c_compiler() is None:
        return "not built: no C compiler here"
    build = build_kernels(tmp_path_factory.mktemp("kernels"))
    if build.path is None or not kernels.load_library(build.path):
        return f"not built by {build.how} for the tests:\n{build.log}"
    return f"built for the tests by {build.how}"


@pytest.fixture(params=["compiled", "torch"])
def arithmetic(request, monkeypatch, compiled_loops):
    """Run a test twice: with the compiled loops (ostate.analysis.native.kernels) and with the torch ops
    ostate uses without them."""
    from ostate.analysis.native import kernels

    if request.param == "torch":
        monkeypatch.setattr(kernels, "_LIB", None)
    elif not kernels.available():
        pytest.skip(f"ostate's compiled loops are not in use ({compiled_loops.splitlines()[0]})")
    return request.param


@pytest.fixture
def adamw_checkpoint(tmp_path):
    """A training checkpoint: model, AdamW state after 3 steps, a scheduler, epoch and step."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        train(model, opt, steps=1)
        sched.step()
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": 1,
            "global_step": 3,
        },
        path,
    )
    return path, model, opt


# Checkpoints written by the real libraries (tests/helpers/builders.py), made once per test session.
@pytest.fixture(scope="session")
def gpt2_run(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.helpers.builders import tiny_gpt2, train_with_trainer

    return train_with_trainer(tmp_path_factory.mktemp("gpt2"), tiny_gpt2())


@pytest.fixture(scope="session")
def accelerate_run(tmp_path_factory):
    pytest.importorskip("accelerate")
    from tests.helpers.builders import save_with_accelerate

    return save_with_accelerate(tmp_path_factory.mktemp("accelerate") / "state")


@pytest.fixture(scope="session")
def dcp_sharded(tmp_path_factory):
    """DCP layouts saved by two gloo processes with FSDP2 (tensors in chunks across two files)."""
    from tests.helpers.builders import save_dcp_layouts

    directory = tmp_path_factory.mktemp("dcp2")
    save_dcp_layouts(directory, world_size=2)
    return directory


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """Two checkpoints of one run of the demo model (AdamW, two param groups): steps 30 and 60."""
    from ostate.demo import make_demo_run

    return make_demo_run(tmp_path_factory.mktemp("demo-run"), steps=60, save_every=30)
