"""ostate reset on real checkpoints: the result loads into the real optimizer and model, the next
step is the one the strategy implies, and everything else is kept exactly.

The oracle for "what the strategy implies" is written out here by hand on the saved
state dict (zero the first moment, drop the state, ...), independently of
ostate.reset.strategies; torch steps both.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ostate
from ostate import OstateError
from ostate.reset.strategies import V_AGE_KEY
from ostate.reset.write import reset
from tests.helpers.common import Net, run_cli, sha256, train


def fixed_grads(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


def step_from(model_state, optimizer_state, grads, make_optimizer=None):
    """Load a model and an AdamW like the checkpoint's from state dicts, take one step with ``grads``;
    returns the change of every parameter."""
    model = Net()
    model.load_state_dict(model_state)
    opt = (make_optimizer or (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01)))(model.parameters())
    opt.load_state_dict(copy.deepcopy(optimizer_state))
    before = [p.detach().clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def assert_same_steps(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ torch.save files
def test_reset_m_then_step_equals_a_step_from_a_zeroed_first_moment(adamw_checkpoint, tmp_path):
    path, model, opt = adamw_checkpoint
    out = tmp_path / "reset-m.pt"
    reset(path, out, "reset-m")
    saved, written = torch.load(path, weights_only=True), torch.load(out, weights_only=True)
    expected = copy.deepcopy(saved["optimizer"])
    for state in expected["state"].values():
        state["exp_avg"] = torch.zeros_like(state["exp_avg"])
    grads = fixed_grads(model)
    assert_same_steps(
        step_from(written["model"], written["optimizer"], grads), step_from(saved["model"], expected, grads)
    )
    # and it is not the reloaded step
    reloaded = step_from(saved["model"], saved["optimizer"], grads)
    assert not all(
        torch.equal(x, y) for x, y in zip(reloaded, step_from(written["model"], written["optimizer"], grads))
    )


def test_fresh_then_step_equals_a_new_optimizers_first_step(adamw_checkpoint, tmp_path):
    path, model, _ = adamw_checkpoint
    out = tmp_path / "fresh.pt"
    reset(path, out, "fresh")
    saved, written = torch.load(path, weights_only=True), torch.load(out, weights_only=True)
    # written as the values a new AdamW starts from: zero moments, step 0
    assert all(
        float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any()
        for s in written["optimizer"]["state"].values()
    )
    new_optimizer = {"state": {}, "param_groups": saved["optimizer"]["param_groups"]}  # the saved (scheduled) lr
    grads = fixed_grads(model)
    assert_same_steps(
        step_from(written["model"], written["optimizer"], grads), step_from(saved["model"], new_optimizer, grads)
    )


def test_everything_but_the_optimizer_state_is_kept_tensor_for_tensor(adamw_checkpoint, tmp_path):
    path, _, _ = adamw_checkpoint
    out = tmp_path / "reset-v.pt"
    reset(path, out, "reset-v")
    saved, written = torch.load(path, weights_only=True), torch.load(out, weights_only=True)
    assert list(written) == list(saved)
    assert all(torch.equal(written["model"][k], v) for k, v in saved["model"].items())
    assert written["scheduler"] == saved["scheduler"] and written["epoch"] == 1 and written["global_step"] == 3
    assert written["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]
    for index, state in saved["optimizer"]["state"].items():
        new = written["optimizer"]["state"][index]
        assert torch.equal(new["exp_avg"], state["exp_avg"]) and torch.equal(new["step"], state["step"])
        assert not new["exp_avg_sq"].any()


def test_a_name_regex_touches_only_the_matching_parameters(adamw_checkpoint, tmp_path):
    path, model, _ = adamw_checkpoint
    out = tmp_path / "head.pt"
    result = reset(path, out, "reset-v", params=r"^head\.")
    names = [n for n, _ in model.named_parameters()]
    assert result.optimizers[0].actions == {n: "reset-v" if n.startswith("head.") else "reload" for n in names}
    saved, written = torch.load(path, weights_only=True), torch.load(out, weights_only=True)
    for index, name in enumerate(names):
        old, new = saved["optimizer"]["state"][index], written["optimizer"]["state"][index]
        assert torch.equal(
            new["exp_avg_sq"], torch.zeros_like(old["exp_avg_sq"]) if name.startswith("head.") else old["exp_avg_sq"]
        )


def test_keep_v_records_the_age_of_v_and_says_that_attach_is_needed(adamw_checkpoint, tmp_path):
    path, _, _ = adamw_checkpoint
    out = tmp_path / "keep-v.pt"
    result = run_cli("reset", str(path), "--strategy", "keep-v", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "ostate.reset.strategies.attach(optimizer)" in result.stderr and "ostate_v_age" in result.stderr
    written = torch.load(out, weights_only=True)
    assert [g[V_AGE_KEY] for g in written["optimizer"]["param_groups"]] == [3.0]
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in written["optimizer"]["state"].values())


def test_lightning_checkpoint_keeps_its_other_optimizer_and_resumes_in_lightning(tmp_path):
    pytest.importorskip("lightning")
    from tests.test_lightning import L, Module, fit_and_save

    path, _ = fit_and_save(tmp_path, two_optimizers=True)
    out = tmp_path / "reset.ckpt"
    reset(path, out, "fresh", optimizer_index=1)
    saved, written = torch.load(path, weights_only=True), torch.load(out, weights_only=True)
    assert written["optimizer_states"][1]["state"] == {}  # SGD's fresh momentum buffer is no buffer
    assert written["optimizer_states"][0]["state"][0]["exp_avg"].equal(
        saved["optimizer_states"][0]["state"][0]["exp_avg"]
    )
    assert written["loops"] == saved["loops"] and written["global_step"] == saved["global_step"]
    # Lightning itself resumes from it: model, both optimizers and the loops are restored.
    trainer = L.Trainer(
        max_steps=saved["global_step"] + 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    data = torch.utils.data.TensorDataset(torch.randn(64, 4))
    trainer.fit(Module(two_optimizers=True), torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=out)
    assert trainer.global_step > saved["global_step"]


def test_safetensors_optimizer_state_is_written_back_as_safetensors(adamw_checkpoint, tmp_path):
    path, _, opt = adamw_checkpoint
    source = tmp_path / "opt.safetensors"
    ostate.convert(path, source)
    out = tmp_path / "reset.safetensors"
    reset(source, out, "reset-step", params="norm")
    ckpt = ostate.load(out)
    assert ckpt.format == "safetensors"
    before = ostate.load(source).optimizers[0]
    for p in ckpt.optimizers[0].params:
        old = before.param(p.name)
        assert p.name_source == old.name_source == "model-order"
        assert p.step == (0.0 if "norm" in p.name else old.step)
        assert torch.equal(p.read("exp_avg"), old.read("exp_avg"))


# ------------------------------------------------------------------------------ refusals
def test_the_input_is_never_written_over(adamw_checkpoint, tmp_path):
    path, _, _ = adamw_checkpoint
    digest = sha256(path)
    with pytest.raises(OstateError, match="over or into the input"):
        reset(path, path, "fresh")
    (tmp_path / "exists.pt").write_bytes(b"x")
    with pytest.raises(OstateError, match="already exists"):
        reset(path, tmp_path / "exists.pt", "fresh")
    reset(path, tmp_path / "exists.pt", "fresh", overwrite=True)
    assert sha256(path) == digest


def test_a_directory_output_may_be_neither_inside_nor_around_the_input(gpt2_run, tmp_path):
    with pytest.raises(OstateError, match="over or into the input"):
        reset(gpt2_run.checkpoint, gpt2_run.checkpoint / "reset", "fresh")
    with pytest.raises(OstateError, match="contains the input"):
        reset(gpt2_run.checkpoint, gpt2_run.output_dir, "fresh", overwrite=True)


def test_a_strategy_that_does_not_apply_or_a_regex_that_matches_nothing_is_refused(adamw_checkpoint, tmp_path):
    path, _, _ = adamw_checkpoint
    with pytest.raises(OstateError, match="matches no parameter"):
        reset(path, tmp_path / "a.pt", "reset-v", params="^nothing")
    with pytest.raises(OstateError, match="already names its parameters"):
        reset(path, tmp_path / "a.pt", "reset-v:head", params="head")
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt)
    torch.save(opt.state_dict(), tmp_path / "bare.pt")  # no model beside it: no names
    with pytest.raises(OstateError, match="have no name"):
        reset(tmp_path / "bare.pt", tmp_path / "b.pt", "reset-m", params="head")
    result = run_cli("reset", str(tmp_path / "bare.pt"), "--strategy", "reset-v", "-o", str(tmp_path / "c.pt"))
    assert result.returncode == 2 and "does not apply" in result.stderr
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize(
    "make,needs",
    [
        (lambda p: torch.optim.Adam(p, lr=1e-2), True),
        (lambda p: torch.optim.Adamax(p, lr=1e-2), False),  # no bias correction of its infinity norm: no age
        (lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9), False),
    ],
)
def test_keep_v_asks_for_attach_only_where_it_records_an_age(tmp_path, make, needs):
    model = torch.nn.Linear(3, 2)
    opt = make(model.parameters())
    for _ in range(3):
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pt")
    result = reset(tmp_path / "a.pt", tmp_path / "b.pt", "keep-v")
    written = torch.load(tmp_path / "b.pt", weights_only=True)["optimizer"]["param_groups"]
    assert result.needs_attach is needs and ("ostate_v_age" in written[0]) is needs
    assert any("attach" in note for note in result.notes) is needs
