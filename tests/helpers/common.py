"""Shared test helpers: small real models trained by real torch optimizers, saved with torch.save, and the CLI run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent.parent


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
        [sys.executable, "-m", "ostate_cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=600,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)
