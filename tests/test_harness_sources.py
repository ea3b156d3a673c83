"""Every checkpoint layout ostate reads as the source of an ablation, each written by the real library.

Each source is checked against the plain way of loading it (the state the library
itself saved, by parameter name), then used for a 2-strategy, 1-seed, 2-step ablation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import ostate
from ostate.errors import OstateError
from ostate.harness import Spec, Sweep, Task, run
from ostate.harness.source import load_source
from ostate.reset.write import reset
from tests.helpers.builders import Mlp
from tests.helpers.common import REPO, Net

DEEPSPEED = REPO / "tests" / "fixtures" / "deepspeed"


def square_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def ablate(tmp_path: Path, source: Path | str, model: Callable[[], nn.Module], inputs: int, **task: Any):
    """A 2-strategy (reload, fresh), 1-seed, 2-step ablation from ``source``; returns the Results and the trials."""
    x = torch.randn(16, inputs, generator=torch.Generator().manual_seed(0))
    spec = Spec(
        Task(
            "from-" + Path(source).name,
            model=model,
            train_batches=lambda n, g: [x[torch.randint(0, 16, (n,), generator=g)]],
            loss=square_loss,
            evaluate=lambda m: float(square_loss(m, x)),
            source=str(source),
            **task,
        ),
        Sweep(strategies=["reload", "fresh"], seeds=[0], steps=2, eval_every=2, batch_size=[8]),
        store=tmp_path / "results.sqlite",
        out=None,
        workers=1,
        progress=False,
    )
    results = run(spec)
    assert results.ran == 2 and not results.failed
    return results, ostate.harness.ResultsStore(spec.store).trials()


def assert_state_is(source, expected: dict[str, dict[str, torch.Tensor]]) -> None:
    """The source's state by name equals ``expected`` (name -> key -> tensor), exactly."""
    got = source.state_by_name()
    assert sorted(got) == sorted(expected)
    for name, keys in expected.items():
        for key, value in keys.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                torch.testing.assert_close(got[name][key].reshape(value.shape), value, rtol=0, atol=0, msg=name)


def test_a_hugging_face_trainer_checkpoint_is_a_source(gpt2_run, tmp_path):
    from tests.helpers.builders import tiny_gpt2

    saved = torch.load(gpt2_run.checkpoint / "optimizer.pt", weights_only=True)
    expected = {gpt2_run.names[i]: s for i, s in saved["state"].items()}
    source = load_source(gpt2_run.checkpoint)
    assert source.format == "hf-trainer" and source.kind == "adamw"
    assert_state_is(source, expected)
    assert set(source.provenance.values()) == {"hf-decay-rule"}

    ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0))
    spec = Spec(
        Task(
            "gpt2",
            model=tiny_gpt2,
            train_batches=lambda n, g: [ids[torch.randint(0, 16, (n,), generator=g)]],
            loss=lambda m, x: m(input_ids=x, labels=x).loss,
            evaluate=lambda m: float(m(input_ids=ids, labels=ids).loss),
            source=str(gpt2_run.checkpoint),
        ),
        Sweep(strategies=["reload", "fresh"], seeds=[0], steps=2, eval_every=2, batch_size=[4]),
        store=tmp_path / "r.sqlite",
        out=None,
        workers=1,
        progress=False,
    )
    results = run(spec)
    assert results.ran == 2 and not results.failed


@pytest.mark.slow
def test_a_dcp_checkpoint_sharded_by_fsdp2_across_two_processes_is_a_source(dcp_sharded, tmp_path):
    oracle = torch.load(dcp_sharded / "oracle.pt", weights_only=True)["optimizer"]  # gathered by torch itself
    source = load_source(dcp_sharded / "nested")
    assert source.format == "dcp" and set(source.provenance.values()) == {"fqn"}
    assert_state_is(source, oracle["state"])
    _, trials = ablate(tmp_path, dcp_sharded / "nested", Mlp, 4)
    assert sorted(trials["strategy"]) == ["fresh", "reload"]


@pytest.mark.parametrize("case", ["zero3_subgroups", "fusedadam"])
def test_a_deepspeed_checkpoint_is_a_source(case, tmp_path):
    # Written by a real DeepSpeed run on two CPU processes (tests/helpers/deepspeed_train.py).
    from tests.helpers.deepspeed_train import TinyNet

    truth = torch.load(DEEPSPEED / case / "ground_truth.pt", weights_only=True)
    source = load_source(DEEPSPEED / case)
    assert source.format == "deepspeed" and "frozen.weight" not in source.names.values()
    assert_state_is(source, {n: {k: s[k] for k in ("exp_avg", "exp_avg_sq")} for n, s in truth.items()})
    for name, s in truth.items():  # the fp32 master weights are the weights trials start from
        torch.testing.assert_close(source.weights[name], s["fp32"], rtol=0, atol=0)
    assert "frozen.weight" in source.weights  # the frozen weight comes from the module, untouched by the optimizer
    ablate(tmp_path, DEEPSPEED / case, TinyNet, 7)


def test_a_lightning_checkpoint_is_a_source(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from tests.test_lightning import Module, fit_and_save

    path, module = fit_and_save(tmp_path)
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]
    names = [n for n, _ in module.named_parameters() if n.startswith("net.")]
    source = load_source(path)
    assert_state_is(source, {names[i]: s for i, s in saved["state"].items()})

    class WithForward(Module):  # the LightningModule itself is the fine-tuning model, names as saved
        def forward(self, x):
            return self.net(x)

    _, trials = ablate(tmp_path, path, WithForward, 4)
    assert set(trials["strategy"]) == {"reload", "fresh"}


def test_an_accelerate_folder_with_two_optimizers_needs_one_chosen(accelerate_run, tmp_path):
    with pytest.raises(OstateError, match="holds 2 optimizers.*--optimizer-index"):
        load_source(accelerate_run.directory)


def test_the_output_of_ostate_reset_is_a_source_and_carries_the_reset_state(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        square_loss(model, torch.randn(8, 4)).backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    reset(tmp_path / "ckpt.pt", tmp_path / "reset.pt", strategy="reset-v")
    source = load_source(tmp_path / "reset.pt")
    for name, state in source.state_by_name().items():
        assert not state["exp_avg_sq"].any() and state["exp_avg"].any(), name
    ablate(tmp_path, tmp_path / "reset.pt", Net, 4)


def test_a_model_that_does_not_fit_the_source_is_refused_naming_both_sides(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    square_loss(model, torch.randn(8, 4)).backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(OstateError, match=r"none of the fine-tuning model's 4 parameters.*model has 0\.weight"):
        ablate(tmp_path, tmp_path / "ckpt.pt", lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)), 4)


def test_a_folder_source_travels_to_ray_workers_as_an_archive_and_reads_the_same(gpt2_run):
    from ostate.harness.executors import _read, local_source

    packed = _read(str(gpt2_run.checkpoint))
    here = local_source(packed)
    assert local_source(packed) == here  # written once per content
    original, copy = load_source(gpt2_run.checkpoint), load_source(here)
    assert original.fingerprint == copy.fingerprint
    assert sorted(original.names.values()) == sorted(copy.names.values())
