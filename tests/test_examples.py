"""Every example runs as a user would run it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.common import REPO

EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    try:
        done = subprocess.run(
            [sys.executable, str(REPO / "examples" / name)], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired as e:
        printed = (e.stdout or b"")[-2000:] + (e.stderr or b"")[-2000:]
        pytest.fail(f"examples/{name} ran past {e.timeout} s; it printed:\n" + printed.decode(errors="replace"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
