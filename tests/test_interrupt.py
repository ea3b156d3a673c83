"""Ctrl-C mid-run: a real SIGINT to the ``ostate`` process leaves no half-written file and a consistent store.

The child runs the real command; to make "mid-run" certain on any machine, it reads
each tensor slowly (a sleep wrapped around ``TensorRef.read``) and says when the first
read began, by creating a file. The parent then sends SIGINT to the child's process
group, as a terminal does on Ctrl-C, and checks: exit code 130, no output, no
temporary file, inputs unchanged.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.common import REPO, Net, sha256, train

_CHILD = """
import os, sys, time
import ostate.state
started, argv = sys.argv[1], sys.argv[2:]
original = ostate.state.TensorRef.read
def slow_read(self):
    if not os.path.exists(started):
        open(started, "w").close()
    time.sleep(0.2)
    return original(self)
ostate.state.TensorRef.read = slow_read
from ostate_cli.main import main
sys.argv = ["ostate", *argv]
main()
"""


def interrupt(tmp_path: Path, *argv: str, ready=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``ostate ARGV`` and send SIGINT once ``ready()`` (default: the first tensor read began)."""
    started = tmp_path / "started"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(started), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    ready = ready or started.exists
    deadline = time.monotonic() + timeout
    while not ready():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the command never reached the point to interrupt"
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(child.pid, signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Net(width=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt, steps=2)
    path = tmp_path / "in" / "ckpt.pt"
    path.parent.mkdir()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "started")


@pytest.mark.slow
def test_ctrl_c_during_convert_leaves_no_output_and_no_temporary_file(tmp_path, checkpoint):
    digest = sha256(checkpoint)
    out = tmp_path / "out"
    out.mkdir()
    done = interrupt(tmp_path, "convert", str(checkpoint), str(out / "state.safetensors"))
    assert done.returncode == 130, done.stderr
    assert "interrupted" in done.stderr and "Traceback" not in done.stderr
    assert leftovers(out) == []
    assert sha256(checkpoint) == digest


@pytest.mark.slow
def test_ctrl_c_during_reset_leaves_no_output_and_no_temporary_file(tmp_path, checkpoint):
    digest = sha256(checkpoint)
    out = tmp_path / "out"
    out.mkdir()
    done = interrupt(tmp_path, "reset", str(checkpoint), "--strategy", "reset-v", "-o", str(out / "reset.pt"))
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert leftovers(out) == []
    assert sha256(checkpoint) == digest


@pytest.mark.slow
def test_ctrl_c_during_inspect_prints_no_partial_table(tmp_path, checkpoint):
    done = interrupt(tmp_path, "inspect", str(checkpoint), "--workers", "1")
    assert done.returncode == 130, done.stderr
    assert done.stdout == "" and "interrupted" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_during_ablate_keeps_only_complete_trials_in_the_store(tmp_path, workers):
    """With one worker the trials run in the process; with two, on the default process pool,
    whose workers get the terminal's SIGINT too: still exit 130 at once, no traceback.

    The sweep (18 trials) is far longer than the moment between the first saved trial and
    the SIGINT, so some trials are certain to be unfinished: with 9 trials of 30 steps, a
    fast machine's two workers once finished all of them first. The pool's trials run 400
    steps; in the process, 30 are enough, as every tensor read there is slowed."""
    import shutil

    shutil.copytree(REPO / "examples" / "ablation", tmp_path / "ablation-example")
    spec = tmp_path / "ablation-example" / "spec.toml"
    store = tmp_path / "results.sqlite"

    def one_trial_saved() -> bool:
        if not store.exists():
            return False
        try:
            with sqlite3.connect(store) as db:
                return db.execute("SELECT COUNT(*) FROM trials").fetchone()[0] >= 1
        except sqlite3.Error:  # created but not yet initialised
            return False

    done = interrupt(
        tmp_path,
        "ablate",
        str(spec),
        "--strategies",
        "reload,fresh,reset-v",
        "--seeds",
        "0,1,2,3,4,5",
        "--steps",
        "30" if workers == "1" else "400",
        "--eval-every",
        "5",
        "--workers",
        workers,
        "--threads",
        "1",
        "--store",
        str(store),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-plots",
        ready=one_trial_saved,
        timeout=300,
    )
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        trials = db.execute("SELECT trial_id, status FROM trials").fetchall()
        assert 1 <= len(trials) < 18 and all(status == "done" for _, status in trials)
        with_records = {row[0] for row in db.execute("SELECT DISTINCT trial_id FROM records")}
        assert with_records == {trial_id for trial_id, _ in trials}
    assert not [p for p in tmp_path.rglob(".ostate-*")]
