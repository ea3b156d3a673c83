"""ostate reset on checkpoint directories written by the real libraries: the HF Trainer, accelerate,
torch.distributed.checkpoint and DeepSpeed. Each result is loaded back by the library itself
(Trainer resume, Accelerator.load_state, dcp.load + set_state_dict, DeepSpeed's load_checkpoint)
and every file the strategy does not concern is byte-for-byte the input's.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch

import ostate
from ostate import OstateError
from ostate.formats.deepspeed.files import load_file
from ostate.reset.write import reset
from tests.helpers.builders import Mlp, mlp_optimizer
from tests.helpers.common import REPO, run_cli, sha256


def files(directory):
    return {os.path.relpath(os.path.join(d, f), directory) for d, _, names in os.walk(directory) for f in names}


def assert_other_files_identical(source, out, changed):
    assert files(out) == files(source)
    for name in files(source) - set(changed):
        assert sha256(os.path.join(source, name)) == sha256(os.path.join(out, name)), name


# ------------------------------------------------------------------------------ Hugging Face Trainer
@pytest.mark.slow
def test_trainer_checkpoint_resumes_in_the_trainer_with_the_first_block_reset(gpt2_run, tmp_path):
    from transformers import Trainer

    from tests.helpers.builders import RandomTokens, tiny_gpt2, trainer_arguments

    out = tmp_path / "checkpoint-reset"
    result = reset(gpt2_run.checkpoint, out, "reset-m", params=r"^transformer\.h\.0\.")
    assert_other_files_identical(gpt2_run.checkpoint, out, {"optimizer.pt"})
    actions = result.optimizers[0].actions
    assert {n for n, a in actions.items() if a == "reset-m"} == {
        n for n in gpt2_run.names if n.startswith("transformer.h.0.")
    }

    saved = torch.load(gpt2_run.checkpoint / "optimizer.pt", weights_only=True)
    args = trainer_arguments(tmp_path / "resume", gpt2_run.global_step + 4)
    snapshot = _snapshot_class()()
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=RandomTokens(64), callbacks=[snapshot])
    trainer.train(resume_from_checkpoint=str(out))  # loads model, optimizer and scheduler, then the snapshot stops it
    by_name = dict(trainer.model.named_parameters())
    loaded = {n: snapshot.state[by_name[n]] for n in gpt2_run.names}
    for index, name in enumerate(gpt2_run.names):
        expected = saved["state"][index]
        assert torch.equal(loaded[name]["exp_avg_sq"], expected["exp_avg_sq"]), name
        if actions[name] == "reset-m":
            assert not loaded[name]["exp_avg"].any(), name
        else:
            assert torch.equal(loaded[name]["exp_avg"], expected["exp_avg"]), name


def _snapshot_class():
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        """Copies the optimizer state when training begins (after the Trainer loaded the checkpoint), and stops."""

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            self.state = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
            control.should_training_stop = True
            return control

    return Snapshot


# ------------------------------------------------------------------------------ accelerate
def test_accelerate_folder_keeps_the_other_optimizer_file_and_loads_with_load_state(accelerate_run, tmp_path):
    from accelerate import Accelerator

    from tests.helpers.builders import Generator

    out = tmp_path / "state"
    result = reset(accelerate_run.directory, out, "reset-m", optimizer_index=1)
    assert [o.location for o in result.optimizers] == ["optimizer_1.bin"]
    assert_other_files_identical(accelerate_run.directory, out, {"optimizer_1.bin"})

    generator, critic = Generator(), torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    gen_opt = torch.optim.AdamW(generator.parameters(), lr=1e-2, weight_decay=0.01)
    critic_opt = torch.optim.SGD(critic.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(gen_opt, step_size=1, gamma=0.5)
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(generator, critic, gen_opt, critic_opt, schedule)
    accelerator.load_state(str(out))
    original = accelerate_run.optimizers
    # SGD's reset-m removes the momentum buffer (its first step sets it to the gradient).
    assert all("momentum_buffer" not in s for s in prepared[3].optimizer.state.values())
    for p, q in zip(prepared[2].optimizer.param_groups[0]["params"], original[0].param_groups[0]["params"]):
        assert torch.equal(prepared[2].optimizer.state[p]["exp_avg"], original[0].state[q]["exp_avg"])


# ------------------------------------------------------------------------------ torch.distributed.checkpoint
def _trained_mlp(seed=0):
    torch.manual_seed(seed)
    model = Mlp()
    opt = mlp_optimizer(model)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):
        model(torch.randn(8, 4, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _load_with_dcp(directory, flatten):
    """A new model and optimizer (state initialised by one step, as torchtitan does) filled by dcp.load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model, opt = _trained_mlp(seed=5)  # other values, same structure
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options)
    return model, opt


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("strategy", ["reset-m:blocks", "fresh", "keep-v"])
def test_dcp_checkpoint_loads_with_dcp_load_and_set_state_dict(tmp_path, flatten, strategy):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, opt = _trained_mlp()
    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=flatten))
    source = tmp_path / "step-3"
    dcp.save(
        {"model": model_sd, "optimizer": optim_sd, "train_state": {"step": torch.tensor(3)}},
        checkpoint_id=str(source),
        no_dist=True,
    )
    out = tmp_path / "reset"
    reset(source, out, strategy)
    loaded_model, loaded_opt = _load_with_dcp(out, flatten)
    names = dict(model.named_parameters())
    for name, p in loaded_model.named_parameters():
        assert torch.equal(p, names[name]), name  # the model entries are the saved ones
        old, new = opt.state[names[name]], loaded_opt.state[p]
        if strategy == "fresh" or (strategy == "reset-m:blocks" and name.startswith("blocks.")) or strategy == "keep-v":
            assert not new["exp_avg"].any(), name
        else:
            assert torch.equal(new["exp_avg"], old["exp_avg"]), name
        assert torch.equal(
            new["exp_avg_sq"], torch.zeros_like(old["exp_avg_sq"]) if strategy == "fresh" else old["exp_avg_sq"]
        ), name
        assert float(new["step"]) == (0.0 if strategy in ("fresh", "keep-v") else 3.0), name
    assert ostate.load(out).metadata["step"] == 3  # train_state kept


def test_reset_of_a_dcp_checkpoint_prints_no_library_noise(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _trained_mlp()
    model_sd, optim_sd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp_path / "in"), no_dist=True)
    result = run_cli("reset", str(tmp_path / "in"), "--strategy", "reset-v", "-o", str(tmp_path / "out"))
    assert result.returncode == 0 and result.stderr.startswith("wrote "), result.stderr
    assert "warning" not in result.stderr  # torch's "torch.distributed is disabled, ..." on every save


def test_keep_v_age_survives_dcp_when_the_live_group_has_the_key(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _trained_mlp()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp_path / "src"), no_dist=True)
    reset(tmp_path / "src", tmp_path / "out", "keep-v")
    new_model, new_opt = _trained_mlp(seed=5)
    for group in new_opt.param_groups:
        group["ostate_v_age"] = 0.0  # as docs/reset.md says: DCP fills only the keys the live groups have
    model_sd, optim_sd = get_state_dict(new_model, new_opt)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(tmp_path / "out"))
    set_state_dict(new_model, new_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    assert [g["ostate_v_age"] for g in new_opt.param_groups] == [3.0, 3.0]


def test_sharded_dcp_layouts_keep_every_other_entry_as_torch_reads_them(dcp_sharded, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    for layout in ("nested", "flat", os.path.join("torchtitan", "step-3")):
        source, out = dcp_sharded / layout, tmp_path / layout.replace(os.sep, "-")
        reset(source, out, "reset-v", params="head")
        dcp_to_torch_save(source, tmp_path / "before.pt")
        dcp_to_torch_save(out, tmp_path / "after.pt")
        before = torch.load(tmp_path / "before.pt", weights_only=False)
        after = torch.load(tmp_path / "after.pt", weights_only=False)
        assert set(after) == set(before)
        for key in before:
            if key == "optimizer":
                continue
            assert _equal(before[key], after[key]), (layout, key)
        for key, value in _flat_items(before["optimizer"]):
            changed = "head" in key and key.endswith("exp_avg_sq")
            got = dict(_flat_items(after["optimizer"]))[key]
            assert _equal(got, torch.zeros_like(value) if changed else value), (layout, key)


def _flat_items(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _flat_items(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list) and any(isinstance(v, dict) for v in node):
        for i, v in enumerate(node):
            yield from _flat_items(v, f"{prefix}.{i}")
    else:
        yield prefix, node


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------ DeepSpeed
FIXTURES = REPO / "tests" / "fixtures" / "deepspeed"
TRAINED = ("embed.weight", "head.weight", "embed.bias", "head.bias")


@pytest.mark.parametrize("case", ["zero3_subgroups", "fusedadam"])
@pytest.mark.parametrize(
    "strategy,params",
    [("reset-v", "embed"), ("reset-m", "weight"), ("fresh", None), ("keep-v", None), ("reset-step", "bias")],
)
def test_deepspeed_partitions_get_the_strategy_parameter_by_parameter(case, strategy, params, tmp_path):
    source, out = FIXTURES / case, tmp_path / "out"
    result = reset(source, out, strategy, params=params)
    before, after = ostate.load(source).optimizers[0], ostate.load(out).optimizers[0]
    actions = result.optimizers[0].actions
    for name in TRAINED:
        old, new = before.param(name), after.param(name)
        action = actions[name]
        assert action == (strategy if params is None or params in name else "reload")
        m_reset = action in ("reset-m", "fresh", "keep-v")
        v_reset = action in ("reset-v", "fresh")
        assert torch.equal(
            new.read("exp_avg"), torch.zeros_like(old.read("exp_avg")) if m_reset else old.read("exp_avg")
        )
        assert torch.equal(
            new.read("exp_avg_sq"), torch.zeros_like(old.read("exp_avg_sq")) if v_reset else old.read("exp_avg_sq")
        )
        assert new.step == (0.0 if action in ("fresh", "keep-v", "reset-step") else old.step)
    ages = [g.get("ostate_v_age") for g in after.groups]
    assert ages == ([3.0, 3.0, None] if strategy == "keep-v" else [None, None, None])
    optim_files = {p for p in files(source) if "optim_states" in p}
    assert_other_files_identical(source, out, optim_files)


def test_deepspeed_refuses_a_step_reset_of_part_of_a_param_group(tmp_path):
    with pytest.raises(OstateError, match="share one step"):
        reset(FIXTURES / "zero3_subgroups", tmp_path / "out", "fresh", params="embed.weight")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_loads_the_reset_checkpoint_itself(tmp_path):
    out = tmp_path / "out"
    reset(FIXTURES / "zero3_subgroups", out, "keep-v")
    recorded = tmp_path / "loaded.pt"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.deepspeed_load", str(out), "zero3_subgroups", str(recorded)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    loaded = torch.load(recorded, weights_only=False)
    truth = torch.load(FIXTURES / "zero3_subgroups" / "ground_truth.pt", weights_only=True)
    assert loaded["steps"] == [0.0]
    assert [g.get("ostate_v_age") for g in loaded["groups"]] == [3.0, 3.0]
    for name in TRAINED:
        assert not loaded["params"][name]["exp_avg"].any()
        assert torch.equal(loaded["params"][name]["exp_avg_sq"], truth[name]["exp_avg_sq"])
        assert torch.equal(loaded["params"][name]["fp32"], truth[name]["fp32"])


def test_an_fsdp_optimizer_folder_inside_an_accelerate_save_is_rewritten_as_dcp(dcp_sharded, tmp_path):
    source, out = dcp_sharded / "accelerate", tmp_path / "accelerate"
    reset(source, out, "reset-v", params="head")
    before, after = ostate.load(source).optimizers[0], ostate.load(out).optimizers[0]
    assert after.location == "optimizer_0/optimizer"
    for p in before.params:
        new = after.param(p.name)
        assert torch.equal(new.read("exp_avg"), p.read("exp_avg"))
        expected = torch.zeros_like(p.read("exp_avg_sq")) if "head" in p.name else p.read("exp_avg_sq")
        assert torch.equal(new.read("exp_avg_sq"), expected), p.name


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_a_universal_checkpoint_gets_the_strategy_in_its_per_parameter_files(tmp_path):
    universal = tmp_path / "global_step3_universal"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(FIXTURES / "zero3_subgroups" / "global_step3"),
            "--output_folder",
            str(universal),
            "--inject_missing_state",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "reset_universal"
    reset(universal, out, "reset-v", params="embed")
    before, after = ostate.load(universal).optimizers[0], ostate.load(out).optimizers[0]
    for name in TRAINED:
        old, new = before.param(name), after.param(name)
        assert torch.equal(new.read("exp_avg"), old.read("exp_avg"))
        expected = torch.zeros_like(old.read("exp_avg_sq")) if "embed" in name else old.read("exp_avg_sq")
        assert torch.equal(new.read("exp_avg_sq"), expected), name
    changed = {f for f in files(universal) if f.startswith(os.path.join("zero", "embed")) and "exp_avg_sq" in f}
    assert len(changed) == 2
    assert_other_files_identical(universal, out, changed)
    with pytest.raises(OstateError, match="stage 3 universal"):
        reset(universal, tmp_path / "fresh", "fresh")
    # lr= goes to zero/optimizer_state.pt, whose param groups DeepSpeed sets the live groups' values from
    # (ZeRO 3: under optimizer_state_dict); nothing else changes.
    with_lr = tmp_path / "with_lr"
    reset(universal, with_lr, "reload", lr=3e-4)
    settings = load_file(str(with_lr / "zero" / "optimizer_state.pt"), trust_pickle=False)
    assert [g["lr"] for g in settings["optimizer_state_dict"]["param_groups"]] == [3e-4, 3e-4]
    assert_other_files_identical(universal, with_lr, {os.path.join("zero", "optimizer_state.pt")})
