"""Pages of a memory-mapped checkpoint are given back after reading, and the data stays right."""

from __future__ import annotations

import sys

import pytest
import torch

import ostate
from ostate.analysis import summarize
from ostate.formats.files.pages import page_releaser

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise release is Linux-only")


def rss_file_kib() -> int:
    """Resident pages of this process that are mapped from files (kB), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@linux_only
def test_released_pages_leave_resident_memory_and_read_back_unchanged(tmp_path):
    path = tmp_path / "big.pt"
    data = torch.randn(8 << 20)  # 32 MiB
    torch.save({"w": data}, path)
    w = torch.load(path, mmap=True, weights_only=True)["w"]
    release = page_releaser(w)
    before = rss_file_kib()
    assert float(w.sum()) == pytest.approx(float(data.sum()), rel=1e-4)
    touched = rss_file_kib()
    assert touched - before > 24 << 10
    release(0, w.numel() // 2)
    half = rss_file_kib()
    assert touched - half > 12 << 10
    release(0, None)
    assert touched - rss_file_kib() > 24 << 10
    assert torch.equal(w, data)  # read again from the page cache: the same values


@linux_only
def test_analysing_a_checkpoint_does_not_keep_its_pages(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 1024)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)  # 48 MiB
    checkpoint = ostate.load(path)
    before = rss_file_kib()
    table = summarize(checkpoint, workers=2).table()
    assert table["weight_rms"].notna().all()  # weights were read too
    assert rss_file_kib() - before < 8 << 10
    # The checkpoint still reads correctly after its pages were given back.
    assert torch.equal(checkpoint.optimizers[0].params[0].read("exp_avg"), opt.state[model[0].weight]["exp_avg"])


def test_tensors_in_memory_have_nothing_to_release():
    ckpt = ostate.from_state_dict(
        {
            "state": {0: {"momentum_buffer": torch.ones(3)}},
            "param_groups": [{"params": [0], "lr": 0.1, "momentum": 0.9, "dampening": 0, "nesterov": False}],
        }
    )
    ref = ckpt.optimizers[0].params[0].state["momentum_buffer"]
    ref.release()
    assert ref.read().tolist() == [1.0, 1.0, 1.0]
