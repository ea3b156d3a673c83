"""Shared helpers: small real models trained by real torch optimizers, saved with torch.save."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent


class Net(nn.Module):
    """Linear layers, a LayerNorm, a BatchNorm (with buffers) and a head."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.norm = nn.LayerNorm(width)
        self.bn = nn.BatchNorm1d(width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.bn(self.norm(self.inp(x))))))


@pytest.fixture(params=["compiled", "torch"])
def arithmetic(request, monkeypatch):
    """Run a test twice: with the compiled loops (ostate.analysis.kernels) and with the torch ops
    ostate uses without them."""
    from ostate.analysis import kernels

    if request.param == "torch":
        monkeypatch.setattr(kernels, "_LIB", None)
    elif not kernels.available():
        pytest.skip("ostate's compiled loops are not built in this install (no C compiler?)")
    return request.param


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g).to(dtype)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def saved(tmp_path, model: nn.Module, opt: torch.optim.Optimizer, name: str = "ckpt.pt", **extra):
    """A training checkpoint at ``tmp_path / name``: the model's and optimizer's state dicts, and ``extra``."""
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **extra}, path)
    return path


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """Run the command line in this process (click's test runner): same code path, no start-up cost."""
    from click.testing import CliRunner

    from ostate_cli.main import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return CliResult(result.exit_code, result.stdout, result.stderr)


def run_cli_process(*args: str, cwd: str | os.PathLike | None = None, env: dict | None = None) -> CliResult:
    """Run the installed ``ostate`` command in a fresh process, as a user would."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "ostate_cli.main", *args], capture_output=True, text=True, cwd=cwd, env=full_env,
        timeout=600,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


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
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
         "epoch": 1, "global_step": 3},
        path,
    )
    return path, model, opt


# Checkpoints written by the real libraries (tests/builders.py), made once per test session.
@pytest.fixture(scope="session")
def gpt2_run(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.builders import tiny_gpt2, train_with_trainer

    return train_with_trainer(tmp_path_factory.mktemp("gpt2"), tiny_gpt2())


@pytest.fixture(scope="session")
def accelerate_run(tmp_path_factory):
    pytest.importorskip("accelerate")
    from tests.builders import save_with_accelerate

    return save_with_accelerate(tmp_path_factory.mktemp("accelerate") / "state")


@pytest.fixture(scope="session")
def dcp_sharded(tmp_path_factory):
    """DCP layouts saved by two gloo processes with FSDP2 (tensors in chunks across two files)."""
    from tests.builders import save_dcp_layouts

    directory = tmp_path_factory.mktemp("dcp2")
    save_dcp_layouts(directory, world_size=2)
    return directory


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """Two checkpoints of one run of the demo model (AdamW, two param groups): steps 30 and 60."""
    from ostate.demo import make_demo_run

    return make_demo_run(tmp_path_factory.mktemp("demo-run"), steps=60, save_every=30)
