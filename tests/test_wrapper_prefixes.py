"""torch.compile's '_orig_mod.' and DDP's 'module.' prefixes are dropped from names, and the header says so."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

import ostate
from ostate.report import inspect, render
from tests.helpers.common import Net, train


def test_a_compiled_models_checkpoint_is_named_without_orig_mod(tmp_path):
    model = Net()
    compiled = torch.compile(model, backend="eager")  # the same OptimizedModule and names as inductor's
    opt = torch.optim.AdamW(compiled.parameters())
    train(compiled, opt, steps=1)
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    torch.save({"model": compiled.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    ckpt = ostate.load(tmp_path / "c.pt")
    o = ckpt.optimizers[0]
    assert [p.name for p in o.params] == [n for n, _ in model.named_parameters()]
    assert {p.name_source for p in o.params} == {"model-order"}
    assert o.name_notes == [f"torch.compile's '_orig_mod.' prefix dropped from {len(o.params)} names"]
    # The model's weights follow the names: the weight columns are there.
    assert set(ckpt.weights or {}) >= {p.name for p in o.params}
    table = ostate.analyze(ckpt)
    assert table["weight_rms"].notna().all()
    assert "prefix dropped" in render(inspect(ckpt))


def test_param_names_of_a_compiled_model_lose_the_prefix_too(tmp_path):
    model = Net()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(compiled.named_parameters(), lr=0.1, momentum=0.9)  # torch >= 2.6 saves param_names
    train(compiled, opt, steps=1)
    o = ostate.from_state_dict(opt.state_dict()).optimizers[0]
    assert [p.name for p in o.params] == [n for n, _ in model.named_parameters()]
    assert {p.name_source for p in o.params} == {"param_names"} and len(o.name_notes) == 1


def test_a_prefix_only_some_names_carry_is_kept(tmp_path):
    model = torch.nn.Module()
    model.module = torch.nn.Linear(2, 2)  # a real submodule called 'module', beside another
    model.head = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    o = ostate.from_state_dict(opt.state_dict()).optimizers[0]
    assert [p.name for p in o.params] == ["module.weight", "module.bias", "head.weight", "head.bias"]
    assert o.name_notes == []


DDP_RUN = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from tests.helpers.common import Net, train
    out = sys.argv[1]
    dist.init_process_group("gloo", init_method=f"file://{out}/.store", rank=0, world_size=1)
    model = DistributedDataParallel(torch.compile(Net(), backend="eager"))
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, steps=1)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f"{out}/ddp.pt")
    dist.destroy_process_group()
    """
)


def test_ddp_around_a_compiled_model_drops_both_prefixes(tmp_path):
    # DDP in a process group of one (gloo), in its own process: the test process keeps no group.
    done = subprocess.run([sys.executable, "-c", DDP_RUN, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert next(iter(saved["model"])).startswith("module._orig_mod.")
    o = ostate.load(tmp_path / "ddp.pt").optimizers[0]
    assert [p.name for p in o.params] == [n for n, _ in Net().named_parameters()]
    assert [note.split("'")[2] for note in o.name_notes] == ["module.", "_orig_mod."]
