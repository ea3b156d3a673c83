"""Run ostate commands where the kernel really refuses writes: a small file system that fills up, a
read-only one, a folder the process may not write to.

How each is made, and why:

- ``full``: a tmpfs of a few KiB mounted on the output folder inside a new user and mount
  namespace (``unshare --user --map-root-user --mount``: no privileges needed, root or
  not, where unprivileged user namespaces are allowed). Writes fail part-way with
  ``ENOSPC``, exactly as on a full disk. Where namespaces are not available the folder
  stays on the normal disk and the process's file size limit (``RLIMIT_FSIZE``) is set
  to the same size instead: writes then fail part-way with ``EFBIG`` (another errno, but
  a real refusal by the kernel in the middle of a file); ``mechanism`` in the results
  says which was used.
- ``readonly``: a read-only bind mount of the folder in such a namespace: ``EROFS``, as
  on a read-only file system. ``chmod 0555`` does not stop root (``CAP_DAC_OVERRIDE``),
  which these tests often run as.
- ``denied``: the folder ``chmod 0555`` (done by the caller) and the command held to
  file permissions: as root, ``setpriv`` drops the capabilities that override them (as in
  tests/test_hostile_input.py): ``EACCES``.

The commands run in this one process through click's test runner (one start-up for all
of them); after each, every file left under the folder is listed, so that the test can
check nothing partial or temporary stayed. Mounts vanish with the process, so that
listing has to be made here.

Usage (what :func:`run_confined` does): ``python -m tests.helpers.confined CASES.json RESULTS.json``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_WITHOUT_OVERRIDE = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
]


@dataclass
class Case:
    """One command: ``argv`` run with ``folder`` made ``mode`` (``full`` with ``size`` bytes, ``readonly``, ``denied``)."""

    argv: list[str]
    folder: str
    mode: str
    size: int = 0
    count_trials: str | None = None  # a results store whose finished trials to count afterwards


@dataclass
class Outcome:
    returncode: int
    stderr: str
    left: list[str]  # files under the folder afterwards
    mechanism: str
    trials: int | None


def namespaces_work() -> bool:
    """Whether ``unshare --user --map-root-user --mount`` can mount a tmpfs here."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /tmp 2>/dev/null"],
        capture_output=True,
        timeout=60,
    )
    return probe.returncode == 0


def can_drop_override() -> bool:
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


def run_confined(cases: list[Case], work: Path) -> list[Outcome]:
    """Run ``cases`` (all of one kind of confinement) in one fresh process; their outcomes in order."""
    modes = {c.mode for c in cases}
    assert len(modes) == 1, modes
    (mode,) = modes
    spec, results = work / "cases.json", work / "results.json"
    spec.write_text(json.dumps([c.__dict__ for c in cases]))
    command = [sys.executable, "-m", "tests.helpers.confined", str(spec), str(results)]
    if mode in ("full", "readonly") and namespaces_work():
        command = ["unshare", "-rm", *command]
    elif mode == "denied" and os.geteuid() == 0:
        command = [*_WITHOUT_OVERRIDE, *command]
    repo = Path(__file__).resolve().parent.parent.parent
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(repo)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=repo, env=env)
    assert done.returncode == 0 and results.exists(), done.stderr[-3000:]
    return [Outcome(**o) for o in json.loads(results.read_text())]


def _confine(case: Case, in_namespace: bool) -> str:
    if case.mode == "full":
        if in_namespace:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={case.size}", "tmpfs", case.folder], check=True)
            return "tmpfs"
        resource.setrlimit(resource.RLIMIT_FSIZE, (case.size, resource.RLIM_INFINITY))
        return "RLIMIT_FSIZE"
    if case.mode == "readonly":
        assert in_namespace, "a read-only folder needs a mount namespace"
        subprocess.run(["mount", "--bind", case.folder, case.folder], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", case.folder], check=True)
        return "read-only bind mount"
    return "chmod 0555" + (" without CAP_DAC_OVERRIDE" if os.geteuid() == 0 else "")


def _release(case: Case, in_namespace: bool) -> None:
    if case.mode == "full" and not in_namespace:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _trials(store: str | None) -> int | None:
    if store is None or not os.path.exists(store):
        return None
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return db.execute("SELECT count(*) FROM trials WHERE status = 'done'").fetchone()[0]
    finally:
        db.close()


def main() -> None:
    from tests.helpers.common import run_cli

    cases = [Case(**c) for c in json.loads(Path(sys.argv[1]).read_text())]
    in_namespace = _in_new_namespace()
    outcomes = []
    for case in cases:
        mechanism = _confine(case, in_namespace)
        try:
            result = run_cli(*case.argv)
        finally:
            _release(case, in_namespace)
        left = sorted(str(p.relative_to(case.folder)) for p in Path(case.folder).rglob("*") if p.is_file())
        outcomes.append(Outcome(result.returncode, result.stderr, left, mechanism, _trials(case.count_trials)))
    Path(sys.argv[2]).write_text(json.dumps([o.__dict__ for o in outcomes]))


def _in_new_namespace() -> bool:
    """True when this process runs in a user namespace of its own (started by ``unshare -r``)."""
    with open("/proc/self/uid_map") as f:
        return f.read().split() != ["0", "0", "4294967295"]


if __name__ == "__main__":
    main()
