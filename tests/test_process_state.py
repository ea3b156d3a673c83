"""A library call leaves the process as it found it; the ``ostate`` program tunes its own.

Three settings are watched: torch's intra-op thread count, whether Python's cyclic garbage
collector is on, and glibc's allocator thresholds (every ``mallopt`` goes through
``ostate.analysis.native.tuning._LIBC``, replaced here by a recorder). They are observed
while the work runs (inside each parameter's summary, each comparison, each checkpoint
read) and after it.
"""

from __future__ import annotations

import gc

import pytest
import torch

import ostate
from ostate.analysis import engine
from ostate.analysis.native import tuning
from ostate.compare import compute
from ostate.formats import registry
from tests.helpers.common import run_cli

THREADS = 3  # not 1 (the program's setting) nor, on most machines, torch's default


class Libc:
    """Stands in for glibc: records ``mallopt`` and ``malloc_trim`` calls (or fails on them)."""

    def __init__(self, *, allowed: bool):
        self.allowed = allowed
        self.calls: list = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        if not self.allowed:
            raise AssertionError(f"mallopt({param}, {value}) called by the library")
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        if not self.allowed:
            raise AssertionError("malloc_trim called by the library")
        return 1


@pytest.fixture
def process(monkeypatch):
    """Torch at THREADS intra-op threads and the collector on; what was seen while ostate worked, by where."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    was_enabled = gc.isenabled()
    gc.enable()
    seen: dict[str, set] = {}

    def observed(where: str, fn):
        def wrapper(*args, **kwargs):
            seen.setdefault(where, set()).add((torch.get_num_threads(), gc.isenabled()))
            return fn(*args, **kwargs)

        return wrapper

    for where, module, name in [
        ("summary", engine, "summarize_param"),
        ("summary", engine, "summarize_tiny"),
        ("comparison", compute, "_compare_param"),
    ]:
        monkeypatch.setattr(module, name, observed(where, getattr(module, name)))
    choose = registry.choose

    def observed_choose(*args, **kwargs):
        reader = choose(*args, **kwargs)
        read = observed("load", reader.read)

        class Observed:
            name = reader.name

            def read(self, *a, **k):
                return read(*a, **k)

        return Observed()

    monkeypatch.setattr(registry, "choose", observed_choose)
    yield seen
    torch.set_num_threads(before)
    if not was_enabled:
        gc.disable()


def checkpoints(tmp_path) -> list:
    """Two checkpoints of one AdamW run: a 64x64 layer (one parameter at a time) and tiny ones (batched)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    paths = []
    for step in range(2):
        model(torch.randn(8, 64)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        paths.append(tmp_path / f"step{step}.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, paths[-1])
    return paths


def test_library_calls_leave_threads_collector_and_allocator_as_they_found_them(process, tmp_path, monkeypatch):
    libc = Libc(allowed=False)
    monkeypatch.setattr(tuning, "_LIBC", libc)
    a, b = checkpoints(tmp_path)
    checkpoint = ostate.load(b)
    for workers in (1, 2):
        assert len(ostate.analyze(checkpoint, workers=workers)) == 4
        ostate.analysis.summarize(checkpoint, workers=workers, joint=True)
    ostate.compare.compare(a, b, workers=2)
    assert set(process) == {"load", "summary", "comparison"}
    for where, states in process.items():
        assert states == {(THREADS, True)}, f"while {where}: (threads, collector on) = {states}"
    assert (torch.get_num_threads(), gc.isenabled()) == (THREADS, True)
    assert libc.calls == []


def test_the_program_runs_each_command_tuned_and_restores_the_process(process, tmp_path, monkeypatch):
    libc = Libc(allowed=True)
    monkeypatch.setattr(tuning, "_LIBC", libc)
    a, b = checkpoints(tmp_path)
    assert run_cli("inspect", str(b), "--workers", "2").returncode == 0
    assert run_cli("compare", str(a), str(b), "--workers", "1").returncode == 0
    assert set(process) == {"load", "summary", "comparison"}
    for where, states in process.items():
        assert states == {(1, False)}, f"while {where}: (threads, collector on) = {states}"
    assert (torch.get_num_threads(), gc.isenabled()) == (THREADS, True)
    raise_, restore = (
        [(tuning._M_TRIM_THRESHOLD, tuning._KEEP_TRIM), (tuning._M_MMAP_THRESHOLD, tuning._KEEP_MMAP)],
        [
            (tuning._M_TRIM_THRESHOLD, tuning._DEFAULT_TRIM),
            (tuning._M_MMAP_THRESHOLD, tuning._DEFAULT_MMAP),
            ("trim", 0),
        ],
    )
    assert libc.calls == (raise_ + restore) * 2  # once around each command

    # A failing command restores the process too.
    libc.calls.clear()
    failed = run_cli("inspect", str(tmp_path / "missing.pt"))
    assert failed.returncode == 2 and failed.stderr.startswith("ostate: error:")
    assert (torch.get_num_threads(), gc.isenabled()) == (THREADS, True)
    assert libc.calls == raise_ + restore


def test_the_demo_trains_untuned_and_inspects_tuned(process, tmp_path, monkeypatch):
    from ostate_cli import demo_cmd

    monkeypatch.setattr(tuning, "_LIBC", Libc(allowed=True))
    trained = []
    make = demo_cmd.make_demo_checkpoint

    def recorded(*args, **kwargs):
        trained.append((torch.get_num_threads(), gc.isenabled()))
        return make(*args, **kwargs)

    monkeypatch.setattr(demo_cmd, "make_demo_checkpoint", recorded)
    assert run_cli("demo", "--dir", str(tmp_path / "demo"), "--steps", "2").returncode == 0
    assert trained == [(THREADS, True)]
    assert process["summary"] == process["load"] == {(1, False)}
    assert (torch.get_num_threads(), gc.isenabled()) == (THREADS, True)


def test_tuned_process_restores_everything_when_the_block_fails(monkeypatch):
    libc = Libc(allowed=True)
    monkeypatch.setattr(tuning, "_LIBC", libc)
    before = torch.get_num_threads(), gc.isenabled()
    with pytest.raises(KeyboardInterrupt):
        with tuning.tuned_process():
            assert (torch.get_num_threads(), gc.isenabled()) == (1, False)
            raise KeyboardInterrupt
    assert (torch.get_num_threads(), gc.isenabled()) == before
    assert libc.calls[-1] == ("trim", 0)


def test_freed_memory_is_kept_inside_and_glibc_defaults_set_after(monkeypatch):
    libc = Libc(allowed=True)
    monkeypatch.setattr(tuning, "_LIBC", libc)
    with tuning.reuse_freed_memory():
        libc.calls.append("inside")
    assert libc.calls.index("inside") == 2  # both thresholds raised before the work
    assert libc.calls[3:] == [
        (tuning._M_TRIM_THRESHOLD, tuning._DEFAULT_TRIM),
        (tuning._M_MMAP_THRESHOLD, tuning._DEFAULT_MMAP),
        ("trim", 0),
    ]
