"""ostate convert: optimizer state as safetensors and as a plain torch state dict, from any readable checkpoint."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors import safe_open

import ostate
from ostate import OstateError
from ostate.formats.files.safetensors_file import SafetensorsFile, write_safetensors
from ostate.state import TensorRef
from tests.helpers.builders import assert_same_state, by_name
from tests.helpers.common import Net, run_cli, sha256, train


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    train(model, optimizer, steps=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return path, model, optimizer, [n for n, _ in model.named_parameters()]


def test_safetensors_round_trip_keeps_state_groups_and_name_provenance(trained, tmp_path):
    path, _, optimizer, names = trained
    out = tmp_path / "opt.safetensors"
    ostate.convert(path, out)
    ckpt = ostate.load(out)
    (o,) = ckpt.optimizers
    assert ckpt.format == "safetensors" and o.kind == "adamw"
    assert [p.name for p in o.params] == names
    assert {p.name_source for p in o.params} == {"model-order"}  # inferred names stay marked as inferred
    assert_same_state(o, by_name(optimizer.state_dict(), names))
    assert o.groups == [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    assert o.groups[0]["betas"] == (0.8, 0.95)


def test_the_file_is_plain_safetensors_that_safetensors_itself_reads(trained, tmp_path):
    path, model, optimizer, _ = trained
    out = tmp_path / "opt.safetensors"
    ostate.convert(path, out)
    with safe_open(out, framework="pt") as f:
        assert f.metadata()["ostate.format"] == "optimizer-state/1"
        exp_avg = f.get_tensor("state.hidden.weight.exp_avg")
        step = f.get_tensor("state.hidden.weight.step")
    assert torch.equal(exp_avg, optimizer.state[model.hidden.weight]["exp_avg"])
    assert step.shape == () and float(step) == 3.0


def test_pt_output_loads_into_the_real_optimizer_and_the_next_step_matches(trained, tmp_path):
    path, model, optimizer, _ = trained
    out = tmp_path / "opt.pt"
    ostate.convert(path, tmp_path / "opt.safetensors")
    ostate.convert(tmp_path / "opt.safetensors", out)  # through safetensors and back
    twin = copy.deepcopy(model)
    fresh = torch.optim.AdamW(twin.parameters())
    fresh.load_state_dict(torch.load(out, weights_only=True))
    train(model, optimizer, steps=1, seed=7)
    train(twin, fresh, steps=1, seed=7)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_sharded_dcp_converts_to_a_state_dict_equal_to_torchs_gathered_one(dcp_sharded, tmp_path):
    out = tmp_path / "opt.pt"
    ostate.convert(dcp_sharded / "nested", out)
    ours = torch.load(out, weights_only=True)
    full = torch.load(dcp_sharded / "oracle.pt", weights_only=True)["optimizer"]
    names = [n for g in full["param_groups"] for n in g["params"]]
    for i, name in enumerate(names):
        for key, value in full["state"][name].items():
            assert torch.equal(ours["state"][i][key], value), (name, key)
    assert [len(g["params"]) for g in ours["param_groups"]] == [len(g["params"]) for g in full["param_groups"]]


@pytest.mark.slow
def test_hf_trainer_checkpoint_converts_with_its_inferred_names(gpt2_run, tmp_path):
    out = tmp_path / "opt.safetensors"
    result = run_cli("convert", str(gpt2_run.checkpoint), str(out))
    assert result.returncode == 0 and "adamw state of 28 of 28 parameters" in result.stderr
    o = ostate.load(out).optimizers[0]
    assert [p.name for p in o.params] == gpt2_run.names
    assert {p.name_source for p in o.params} == {"hf-decay-rule"}
    plain = torch.load(gpt2_run.checkpoint / "optimizer.pt", weights_only=True)
    assert_same_state(o, by_name(plain, gpt2_run.names))


def test_python_int_steps_and_bf16_moments_survive(tmp_path):
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, optimizer, steps=2)
    sd = optimizer.state_dict()
    for entry in sd["state"].values():
        entry["step"] = 2  # as torch < 1.12, bitsandbytes and HF Adafactor save it: a Python int
    torch.save(sd, tmp_path / "opt.pt")
    ostate.convert(tmp_path / "opt.pt", tmp_path / "opt.safetensors")
    o = ostate.load(tmp_path / "opt.safetensors").optimizers[0]
    assert {p.step for p in o.params} == {2.0} and o.params[0].state["step"] == 2
    assert o.params[0].state["exp_avg"].dtype == torch.bfloat16
    assert [p.name for p in o.params] == [f"param.{i}" for i in range(10)]
    assert {p.name_source for p in o.params} == {"none"}


def test_the_input_is_never_written_to(trained, tmp_path):
    path, _, _, _ = trained
    digest = sha256(path)
    with pytest.raises(OstateError, match="over or into the input"):
        ostate.convert(path, path.with_suffix(".pt"))
    with pytest.raises(OstateError, match="over or into the input"):
        ostate.convert(tmp_path, tmp_path / "inside.safetensors", format_hint="torch")
    assert sha256(path) == digest


def test_an_existing_output_needs_overwrite(trained, tmp_path):
    path = trained[0]
    out = tmp_path / "opt.safetensors"
    out.write_bytes(b"old")
    result = run_cli("convert", str(path), str(out))
    assert result.returncode == 2 and "already exists" in result.stderr and out.read_bytes() == b"old"
    assert run_cli("convert", str(path), str(out), "--overwrite").returncode == 0
    assert ostate.load(out).optimizers[0].kind == "adamw"


def test_a_failed_write_leaves_neither_a_partial_file_nor_a_temporary(tmp_path):
    def broken() -> torch.Tensor:
        raise RuntimeError("disk read failed")

    out = tmp_path / "x.safetensors"
    refs = {"a": TensorRef.of(torch.ones(3)), "b": TensorRef((2,), torch.float32, broken)}
    with pytest.raises(RuntimeError, match="disk read failed"):
        write_safetensors(out, refs, {})
    assert os.listdir(tmp_path) == []


def test_several_optimizers_need_an_index(tmp_path):
    a, b = Net(), Net()
    opt_a, opt_b = torch.optim.AdamW(a.parameters()), torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    train(a, opt_a)
    train(b, opt_b)
    path = tmp_path / "gan.pt"
    torch.save({"g": opt_a.state_dict(), "d": opt_b.state_dict()}, path)
    with pytest.raises(OstateError, match=r"holds 2 optimizers.*optimizer_index=K \(0: g, 1: d\)"):
        ostate.convert(path, tmp_path / "out.safetensors")
    assert ostate.convert(path, tmp_path / "out.safetensors", optimizer_index=1).kind == "sgd"
    assert ostate.load(tmp_path / "out.safetensors").optimizers[0].kind == "sgd"


def test_lbfgs_list_state_goes_to_pt_but_not_to_safetensors(tmp_path):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.LBFGS(model.parameters())
    x = torch.randn(8, 3)

    def closure():
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.save(optimizer.state_dict(), tmp_path / "lbfgs.pt")
    with pytest.raises(OstateError, match="is a list; safetensors holds tensors and numbers only.*write a .pt"):
        ostate.convert(tmp_path / "lbfgs.pt", tmp_path / "lbfgs.safetensors")
    ostate.convert(tmp_path / "lbfgs.pt", tmp_path / "copy.pt")
    fresh = torch.optim.LBFGS(model.parameters())
    fresh.load_state_dict(torch.load(tmp_path / "copy.pt", weights_only=True))
    assert fresh.state_dict()["state"][0]["n_iter"] == optimizer.state_dict()["state"][0]["n_iter"]


def test_model_weights_in_safetensors_are_not_optimizer_state(tmp_path):
    from safetensors.torch import save_file

    save_file(Net().state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(OstateError, match="safetensors file with .* tensors but no optimizer state"):
        ostate.load(tmp_path / "model.safetensors")


def test_an_unknown_output_suffix_is_refused_before_reading(trained, tmp_path):
    with pytest.raises(OstateError, match="unknown output type"):
        ostate.convert(trained[0], tmp_path / "opt.npz")


def test_streamed_file_lists_tensors_in_the_header_before_the_data(tmp_path):
    out = tmp_path / "s.safetensors"
    write_safetensors(out, {"z": TensorRef.of(torch.arange(4.0)), "a": TensorRef.of(torch.ones(2, 2))}, {"k": "v"})
    f = SafetensorsFile(str(out))
    assert f.header.tensors == {"z": (torch.float32, (4,)), "a": (torch.float32, (2, 2))}
    assert torch.equal(f.tensor("a"), torch.ones(2, 2)) and f.header.metadata == {"k": "v"}


@pytest.mark.slow
def test_hf_trainer_state_converted_to_pt_steps_like_the_original(gpt2_run, tmp_path):
    from transformers import GPT2LMHeadModel, Trainer

    out = tmp_path / "opt.pt"
    ostate.convert(gpt2_run.checkpoint, out)

    def restored(state_dict):
        model = GPT2LMHeadModel.from_pretrained(gpt2_run.checkpoint)
        decay = set(Trainer.get_decay_parameter_names(None, model))
        params = list(model.named_parameters())
        groups = [
            {"params": [p for n, p in params if n in decay]},
            {"params": [p for n, p in params if n not in decay]},
        ]
        optimizer = torch.optim.AdamW(groups)
        optimizer.load_state_dict(state_dict)
        return model, optimizer

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    results = []
    for state_dict in (
        torch.load(gpt2_run.checkpoint / "optimizer.pt", weights_only=True),
        torch.load(out, weights_only=True),
    ):
        model, optimizer = restored(state_dict)
        model.train(False)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
