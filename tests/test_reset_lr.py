"""What a checkpoint written by ``ostate reset`` does to the resumed run's learning rate, resumed as each
framework resumes (plain torch, Lightning ``Trainer.fit(ckpt_path=...)``, the HF Trainer), against the
first step of a harness trial of the same strategy.

torch's ``load_state_dict`` restores the saved groups' ``lr`` and ``initial_lr``: without ``--lr`` the
resumed run's first step uses the source run's last lr, and a new ``LambdaLR`` its ``initial_lr``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ostate
from ostate.errors import OstateError
from ostate.formats.deepspeed.files import DEEPSPEED_PICKLE, load_file
from ostate.harness.source import load_source
from ostate.harness.transfer import load_weights, optimizer_like_source, transfer_state
from ostate.harness.trial import TrialConfig, lr_factor
from ostate.reset.strategies import apply_strategy, attach, optimizer_kind
from ostate.reset.write import lr_lines, reset
from tests.helpers.common import REPO, Net, run_cli

NEW_LR = 3e-4
# The harness's schedule for the resumed run: 2 warmup steps, so its first step runs at half the peak lr.
CONFIG = TrialConfig("reset-m", seed=0, lr=NEW_LR, warmup=2, steps=10, schedule="cosine")
# A harness trial at NEW_LR throughout (lr_factor 1 at the first step).
CONSTANT = TrialConfig("reset-m", seed=0, lr=NEW_LR, schedule="constant")


def loss_of(model, x):
    return model(x).square().mean()


def batch(seed=7):
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))


def source_run(tmp_path):
    """A source run: AdamW under a decaying LambdaLR for 5 steps, saved with its scheduler."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    for step in range(5):
        opt.zero_grad()
        loss_of(model, batch(step)).backward()
        opt.step()
        sched.step()
    path = tmp_path / "source.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)
    return path, opt.param_groups[0]["lr"]


def harness_optimizer(source_path, strategy: str, model, config=CONFIG) -> torch.optim.Optimizer:
    """A harness trial's optimizer at its first step (the setup of ostate.harness.trial.run_trial, the lr of step 1)."""
    source = load_source(str(source_path))
    load_weights(model, source)
    optimizer = optimizer_like_source(source)(model, config.lr)
    transfer = transfer_state(source, optimizer, model)
    optimizer.load_state_dict(
        apply_strategy(transfer.state_dict, strategy, names=transfer.names, kind=optimizer_kind(optimizer))
    )
    attach(optimizer)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * lr_factor(1, config)
    return optimizer


def harness_first_step(source_path, strategy: str, x, config=CONFIG) -> tuple[float, dict[str, torch.Tensor]]:
    """The first step of a harness trial on the batch ``x``."""
    model = Net()
    return first_step(model, harness_optimizer(source_path, strategy, model, config), x)


def first_step(model, optimizer, x=None) -> tuple[float, dict[str, torch.Tensor]]:
    """The lr and update of one step, on the batch ``x`` (None: on the gradients already set)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = optimizer.param_groups[0]["lr"]
    if x is not None:
        optimizer.zero_grad()
        loss_of(model, x).backward()
    optimizer.step()
    return lr, {n: p.detach() - before[n] for n, p in model.named_parameters()}


def assert_same_step(ours, harness):
    assert ours[0] == pytest.approx(harness[0], rel=1e-12)
    for name, update in harness[1].items():
        torch.testing.assert_close(ours[1][name], update, rtol=1e-6, atol=0, msg=name)


def resume_plain_torch(path, *, built_with: float):
    """A plain torch resume: a new optimizer at the new lr, load_state_dict, then a new LambdaLR."""
    saved = torch.load(path, weights_only=True)
    model = Net()
    model.load_state_dict(saved["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=built_with, weight_decay=0.01)
    opt.load_state_dict(saved["optimizer"])
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s + 1, CONFIG))
    return model, opt


def test_plain_torch_resume_with_lr_set_takes_the_harness_trials_first_step(tmp_path):
    source, _last_lr = source_run(tmp_path)
    out = tmp_path / "reset.pt"
    result = reset(source, out, "reset-m", lr=NEW_LR, scheduler="drop")
    assert "scheduler" not in torch.load(out, weights_only=True)
    assert result.dropped_schedulers == ["scheduler"]
    groups = torch.load(out, weights_only=True)["optimizer"]["param_groups"]
    assert [(g["lr"], g["initial_lr"]) for g in groups] == [(NEW_LR, NEW_LR)]
    model, opt = resume_plain_torch(out, built_with=NEW_LR)
    ours = first_step(model, opt, batch())
    assert ours[0] == pytest.approx(NEW_LR * lr_factor(1, CONFIG))
    assert_same_step(ours, harness_first_step(source, "reset-m", batch()))


def test_without_lr_the_resumed_run_takes_the_saved_learning_rates_and_says_so(tmp_path, capsys):
    source, last_lr = source_run(tmp_path)
    out = tmp_path / "reset.pt"
    done = run_cli("reset", str(source), "--strategy", "fresh", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"first step's lr after load_state_dict: {last_lr:g}" in done.stderr
    assert "takes initial_lr 0.001 as its base" in done.stderr
    assert "scheduler state kept at 'scheduler' (last_epoch=5" in done.stderr
    # Whatever lr the new optimizer is built with, a new LambdaLR starts from the saved initial_lr.
    model, opt = resume_plain_torch(out, built_with=NEW_LR)
    lr, _ = first_step(model, opt, batch())
    assert lr == pytest.approx(1e-3 * lr_factor(1, CONFIG))
    # Without a new scheduler, the saved lr itself.
    saved = torch.load(out, weights_only=True)
    plain = torch.optim.AdamW(Net().parameters(), lr=NEW_LR)
    plain.load_state_dict(saved["optimizer"])
    assert plain.param_groups[0]["lr"] == pytest.approx(last_lr)


def test_initial_lr_is_set_apart_and_lr_lines_say_which(tmp_path):
    source, _ = source_run(tmp_path)
    result = reset(source, tmp_path / "r.pt", "reload", lr=1e-4, initial_lr=5e-4)
    assert (result.optimizers[0].lrs, result.optimizers[0].initial_lrs) == ([1e-4], [5e-4])
    lines = lr_lines(result)
    assert lines[0].startswith("first step's lr after load_state_dict: 0.0001") and "as set" in lines[0]
    assert "initial_lr 0.0005" in lines[1]


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan")])
def test_a_learning_rate_that_is_not_one_is_refused_before_anything_is_written(tmp_path, bad):
    source, _ = source_run(tmp_path)
    with pytest.raises(OstateError, match="is not a learning rate"):
        reset(source, tmp_path / "r.pt", "fresh", lr=bad)
    assert not (tmp_path / "r.pt").exists()


# ------------------------------------------------------------------------------ DeepSpeed
DS_FIXTURES = REPO / "tests" / "fixtures" / "deepspeed"


def partition_groups(tag_dir):
    """Each rank's saved param groups, where DeepSpeed's load_checkpoint restores them from (ZeRO 1-3)."""
    out = []
    for path in sorted(tag_dir.glob("*optim_states.pt")):
        state = load_file(str(path), trust_pickle=False)["optimizer_state_dict"]
        inner = state.get("base_optimizer_state") or state["optimizer_state_dict"]  # ZeRO 1-2 / ZeRO 3
        out.append([{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]])
    return out


@pytest.mark.parametrize("case", ["fusedadam", "zero3_subgroups"])
def test_deepspeed_lr_is_written_into_every_ranks_param_groups(case, tmp_path):
    source, out = DS_FIXTURES / case, tmp_path / "out"
    done = run_cli("reset", str(source), "--strategy", "reload", "--lr", str(NEW_LR), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"first step's lr after engine.load_checkpoint: {NEW_LR:g}" in done.stderr and "as set" in done.stderr
    before, after = partition_groups(source / "global_step3"), partition_groups(out / "global_step3")
    assert len(after) == 2
    for old_rank, new_rank in zip(before, after):
        assert [g["lr"] for g in old_rank] == [1e-2, 5e-3]
        assert [g["lr"] for g in new_rank] == [NEW_LR, NEW_LR]
        assert not any("initial_lr" in g for g in new_rank)  # none saved: none written by --lr alone
        assert [{**g, "lr": None} for g in new_rank] == [{**g, "lr": None} for g in old_rank]  # nothing else
    assert [g.get("lr") for g in ostate.load(out).optimizers[0].groups][:2] == [NEW_LR, NEW_LR]
    # initial_lr is set apart, as for the other formats.
    result = reset(source, tmp_path / "apart", "reset-m", lr=1e-4, initial_lr=5e-4)
    assert (result.optimizers[0].lrs, result.optimizers[0].initial_lrs) == ([1e-4, 1e-4], [5e-4, 5e-4])
    for rank in partition_groups(tmp_path / "apart" / "global_step3"):
        assert [(g["lr"], g["initial_lr"]) for g in rank] == [(1e-4, 5e-4), (1e-4, 5e-4)]


def rewrite_ds_file(path, change):
    saved = load_file(str(path), trust_pickle=False)
    torch.save(change(saved), path, pickle_module=DEEPSPEED_PICKLE)


def test_deepspeed_elastic_checkpoint_refuses_lr_and_a_saved_scheduler_is_not_dropped(tmp_path):
    source = tmp_path / "ds"
    shutil.copytree(DS_FIXTURES / "fusedadam", source)
    # A scheduler state, as engine.save_checkpoint writes one for an engine with a scheduler.
    sched = torch.optim.lr_scheduler.StepLR(torch.optim.AdamW(Net().parameters()), 10)
    rewrite_ds_file(
        source / "global_step3" / "mp_rank_00_model_states.pt", lambda s: {**s, "lr_scheduler": sched.state_dict()}
    )
    done = run_cli("reset", str(source), "--strategy", "fresh", "--scheduler", "drop", "-o", str(tmp_path / "x"))
    assert done.returncode == 2 and not (tmp_path / "x").exists()
    assert "loads the saved lr_scheduler into the engine's scheduler" in done.stderr
    assert "load_lr_scheduler_states=False" in done.stderr
    done = run_cli("reset", str(source), "--strategy", "fresh", "-o", str(tmp_path / "kept"))
    assert "scheduler state kept at 'lr_scheduler' (last_epoch=0" in done.stderr
    # elastic_checkpoint: each rank's state as a list of flat groups, no param groups to hold an lr.
    for path in (source / "global_step3").glob("*optim_states.pt"):

        def elastic(saved):
            inner = saved["optimizer_state_dict"]
            base = inner["base_optimizer_state"]
            flat = [base["state"][i] for i in range(len(base["param_groups"]))]
            return {
                **saved,
                "optimizer_state_dict": {**inner, "base_optimizer_state": flat, "base_optimizer_state_step": 3},
            }

        rewrite_ds_file(path, elastic)
    assert ostate.load(source).optimizers[0].params
    done = run_cli("reset", str(source), "--strategy", "fresh", "--lr", "1e-4", "-o", str(tmp_path / "y"))
    assert done.returncode == 2 and not (tmp_path / "y").exists()
    assert "keeps no param groups: DeepSpeed restores no learning rate from it" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_resumes_a_reset_checkpoint_at_the_lr_written(tmp_path):
    """ZeRO 0 and 2 trained in the spawn, ZeRO 3 from the committed fixture: each reset with
    reset-m and lr=NEW_LR, resumed by engine.load_checkpoint on two ranks, one step taken."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    cases = ["zero0", "zero2", f"zero3_subgroups={DS_FIXTURES / 'zero3_subgroups'}"]
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.deepspeed_resume", str(tmp_path), str(NEW_LR), *cases],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    from tests.helpers.deepspeed_train import STEPS, TinyNet, param_groups

    recorded = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert set(recorded) == {"zero0", "zero2", "zero3_subgroups"}
    for case, run in recorded.items():
        # The engine was built at the config's lr (1e-2, 5e-3): load_checkpoint restored the written one.
        assert [g["lr"] for g in run["groups"]] == [NEW_LR, NEW_LR], case
        # torch's AdamW stepping the loaded state at NEW_LR on both ranks' batches (DeepSpeed averages
        # the ranks' gradients) takes DeepSpeed's first step.
        torch.manual_seed(0)  # the frozen layer, as the source run built it
        net = TinyNet()
        named = dict(net.named_parameters())
        with torch.no_grad():
            for name, saved in run["before"].items():
                named[name].copy_(saved["fp32"])
        (sum((net(x) - y).square().mean() for x, y in run["batches"]) / len(run["batches"])).backward()
        groups = param_groups(net)
        optimizer = torch.optim.AdamW([{**g, "lr": NEW_LR} for g in groups], betas=(0.9, 0.999), eps=1e-8)
        name_of = {id(p): n for n, p in named.items()}
        for p in (p for g in groups for p in g["params"]):
            saved = run["before"][name_of[id(p)]]
            assert not saved["exp_avg"].any()  # reset-m
            optimizer.state[p] = {
                "step": torch.tensor(float(STEPS)),
                **{k: saved[k].clone() for k in ("exp_avg", "exp_avg_sq")},
            }
        optimizer.step()
        for name, saved in run["before"].items():
            expected = named[name].detach() - saved["fp32"]
            torch.testing.assert_close(
                run["after"][name] - saved["fp32"], expected, rtol=1e-6, atol=0, msg=f"{case} {name}"
            )


L = pytest.importorskip("lightning.pytorch")


class Module(L.LightningModule):
    def __init__(self, lr: float, factor):
        super().__init__()
        self.net = Net()
        self.lr, self.factor = lr, factor

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return loss_of(self.net, batch[0])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FirstStep(L.Callback):
    """The lr, batch and update of the first optimizer step of a fit."""

    def __init__(self):
        self.lr = self.batch = self.before = self.update = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.batch is None:
            self.batch = batch[0].clone()
            self.before = {n: p.detach().clone() for n, p in module.net.named_parameters()}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.lr is None:
            self.lr = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.update is None:
            self.update = {n: p.detach() - self.before[n] for n, p in module.net.named_parameters()}


def fit(module, steps, *, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4))
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=list(callbacks),
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow
def test_lightning_resume_with_lr_set_and_scheduler_dropped_takes_the_harness_trials_first_step(tmp_path):
    trainer = fit(Module(1e-3, lambda s: 1 / (1 + s)), 4)
    source = tmp_path / "source.ckpt"
    trainer.save_checkpoint(source)
    out = tmp_path / "reset.ckpt"
    done = run_cli(
        "reset", str(source), "--strategy", "reset-m", "--lr", str(NEW_LR), "--scheduler", "drop", "-o", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert f"first step's lr after load_state_dict: {NEW_LR:g}" in done.stderr
    assert "scheduler state dropped at 'lr_schedulers[0]'" in done.stderr
    assert torch.load(out, weights_only=False)["lr_schedulers"] == []
    # The resumed run's own schedule: constant (Lightning builds it before restoring the optimizer, whose
    # load_state_dict then sets the first step's lr: the one written by --lr).
    seen = FirstStep()
    fit(Module(NEW_LR, lambda s: 1.0), 5, ckpt_path=out, callbacks=[seen])
    assert seen.lr == pytest.approx(NEW_LR)
    # A harness trial at the same lr with a constant schedule (lr_factor 1 at the first step).
    assert lr_factor(1, CONSTANT) == 1.0
    flat = tmp_path / "source.pt"
    ckpt = torch.load(source, weights_only=False)
    model_state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    torch.save({"model": model_state, "optimizer": ckpt["optimizer_states"][0]}, flat)
    assert_same_step((seen.lr, seen.update), harness_first_step(flat, "reset-m", seen.batch, CONSTANT))


# ------------------------------------------------------------------------------ Hugging Face Trainer
def trainer_resuming(output_dir, callbacks):
    """The Trainer resuming tests/conftest.py's gpt2_run (checkpoint-4) for two more steps, as
    tests/test_strategy_callbacks.py builds it (its own lr 1e-3: replaced by the checkpoint's on load)."""
    from transformers import Trainer

    from tests.helpers.builders import RandomTokens, tiny_gpt2, trainer_arguments

    torch.manual_seed(0)
    args = trainer_arguments(output_dir, 6)
    return Trainer(model=tiny_gpt2(), args=args, train_dataset=RandomTokens(64), callbacks=list(callbacks))


def trainer_steps():
    """A TrainerCallback recording each step's lr, and the first step's gradients (after the Trainer's
    clipping: what the optimizer steps on) and update."""
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def __init__(self):
            self.lrs, self.before, self.grads, self.update = [], None, None, None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.lrs.append([g["lr"] for g in optimizer.param_groups])
            if self.grads is None:
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.update is None:
                self.update = {n: p.detach() - self.before[n] for n, p in model.named_parameters()}

    return Steps()


def rms(update: dict[str, torch.Tensor]) -> float:
    total = sum(float(u.double().square().sum()) for u in update.values())
    return (total / sum(u.numel() for u in update.values())) ** 0.5


@pytest.mark.slow
def test_a_trainer_resume_after_reset_with_lr_takes_the_harness_trials_first_step_then_the_saved_schedule(
    gpt2_run, tmp_path
):
    """``ostate reset --lr`` on a Trainer folder, resumed with ``train(resume_from_checkpoint=OUT)``.

    Agrees with a harness trial of the same strategy at that lr (the built-in loop's setup,
    constant schedule) on the first step: its lr and every parameter's update, the harness
    optimizer stepped on the Trainer's own (clipped) gradients. Differs by design from the
    second step on: the Trainer loads ``scheduler.pt`` (it must: without it it would not load
    ``optimizer.pt``) and its ``LambdaLR`` sets ``saved base_lrs × λ(step)``, whatever lr was
    written. A harness trial in trainer mode (the user's Trainer resuming the source with a
    StrategyCallback) keeps the Trainer's own lr: the saved one at the first step, so its
    update is this one scaled by saved lr / --lr, and the same saved schedule after.
    """
    from ostate.harness import trainer_task
    from ostate.harness.trial import run_trial
    from tests.helpers.builders import tiny_gpt2

    source = gpt2_run.checkpoint
    done = run_cli("reset", str(source), "--strategy", "fresh", "--scheduler", "drop", "-o", str(tmp_path / "x"))
    assert done.returncode == 2 and "needs" not in done.stdout
    assert "optimizer.pt only when scheduler.pt is beside it" in done.stderr and not (tmp_path / "x").exists()
    out = tmp_path / "reset"
    done = run_cli("reset", str(source), "--strategy", "reset-m", "--lr", str(NEW_LR), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"first step's lr after load_state_dict: {NEW_LR:g}" in done.stderr
    assert "scheduler state kept at 'scheduler.pt" in done.stderr
    resumed = trainer_steps()
    trainer_resuming(tmp_path / "resumed", [resumed]).train(resume_from_checkpoint=str(out))
    assert len(resumed.lrs) == 2

    # Step 1 = the harness trial's (built-in loop) first step at NEW_LR.
    model = tiny_gpt2()
    optimizer = harness_optimizer(source, "reset-m", model, CONSTANT)
    for name, p in model.named_parameters():
        assert torch.equal(p, resumed.before[name]), name
        p.grad = resumed.grads[name]
    harness = first_step(model, optimizer)
    assert resumed.lrs[0] == pytest.approx([NEW_LR] * len(optimizer.param_groups), rel=1e-12)
    assert_same_step((resumed.lrs[0][0], resumed.update), harness)

    # Step 2 on: the saved schedule. The harness trial in trainer mode resumes the source itself.
    def evaluate(model):
        return 0.0

    task = trainer_task(
        "gpt2", lambda config, callbacks: trainer_resuming(tmp_path / "trial", callbacks), evaluate, source, kind="hf"
    )
    trial = run_trial(task, str(source), TrialConfig("reset-m", seed=0, lr=NEW_LR, steps=2, eval_every=2))
    lrs = {(step, g): v for step, name, g, v in trial.records if name == "lr"}
    saved_lr = [g["lr"] for g in torch.load(source / "optimizer.pt", weights_only=True)["param_groups"]]
    assert [lrs[1, g] for g in range(len(saved_lr))] == pytest.approx(saved_lr, rel=1e-12)
    assert saved_lr[0] != pytest.approx(NEW_LR)  # the trial's first step: the Trainer's own lr, the saved one
    assert [lrs[2, g] for g in range(len(saved_lr))] == pytest.approx(resumed.lrs[1], rel=1e-12)
    schedule = torch.load(source / "scheduler.pt", weights_only=True)
    assert resumed.lrs[1][0] == pytest.approx(schedule["base_lrs"][0] * (6 - 5) / (6 - 1), rel=1e-12)  # linear, T=6
    assert resumed.lrs[1][0] != pytest.approx(NEW_LR)  # not the harness's constant NEW_LR
    trial_rms = next(v for step, name, g, v in trial.records if (step, name, g) == (1, "update_rms", -1))
    assert trial_rms == pytest.approx(rms(resumed.update) * saved_lr[0] / NEW_LR, rel=1e-4)
