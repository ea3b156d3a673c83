"""StrategyCallback for the Hugging Face Trainer and for Lightning: resuming with the callback
takes the same first step as resuming, plainly, from the checkpoint ``ostate reset`` wrote."""

from __future__ import annotations

import pytest
import torch

from ostate.reset.write import reset

STRATEGIES = ["reset-v", "fresh"]


# ---------------------------------------------------------------- Hugging Face Trainer
def resume_trainer(checkpoint, output_dir, callbacks=()):
    """One more step of the run that wrote ``checkpoint`` (tests/helpers/builders.py), resumed by the real Trainer."""
    from transformers import Trainer

    from tests.helpers.builders import RandomTokens, tiny_gpt2, trainer_arguments

    torch.manual_seed(0)
    model = tiny_gpt2()
    args = trainer_arguments(output_dir, 5)  # the checkpoint is at step 4
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_trainer_callback_steps_as_a_resume_from_ostate_reset(gpt2_run, tmp_path, strategy):
    from ostate.integrations.transformers import StrategyCallback

    reset(gpt2_run.checkpoint, tmp_path / "reset", strategy)
    plain = resume_trainer(tmp_path / "reset", tmp_path / "a")
    callback = StrategyCallback(strategy=strategy)
    with_callback = resume_trainer(gpt2_run.checkpoint, tmp_path / "b", [callback])
    reloaded = resume_trainer(gpt2_run.checkpoint, tmp_path / "c")
    assert callback.actions == {strategy: len(gpt2_run.names)}
    for name, value in plain.items():
        torch.testing.assert_close(with_callback[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(reloaded[n], v) for n, v in plain.items())  # the strategy changed the step


def test_the_trainer_callback_restricted_by_a_regex_touches_only_those_parameters(gpt2_run, tmp_path):
    from ostate.integrations.transformers import StrategyCallback

    callback = StrategyCallback(strategy="reset-v", params=r"^lm_head|wte")
    resume_trainer(gpt2_run.checkpoint, tmp_path, [callback])
    assert callback.actions == {"reset-v": 1, "reload": len(gpt2_run.names) - 1}  # wte is tied to lm_head


# ---------------------------------------------------------------- Lightning
def lightning_resume(checkpoint, root, callbacks=()):
    L = pytest.importorskip("lightning.pytorch")
    from tests.test_lightning import Module

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))
    trainer = L.Trainer(
        max_steps=5,  # the checkpoint is at step 4
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=root,
        callbacks=list(callbacks),
    )
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=str(checkpoint))
    return {n: p.detach().clone() for n, p in module.state_dict().items()}  # BatchNorm's running statistics too


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_lightning_callback_steps_as_a_resume_from_ostate_reset(tmp_path, strategy):
    pytest.importorskip("lightning.pytorch")
    from ostate.integrations.lightning import StrategyCallback
    from tests.test_lightning import fit_and_save

    path, _ = fit_and_save(tmp_path)
    reset(path, tmp_path / "reset.ckpt", strategy)
    plain = lightning_resume(tmp_path / "reset.ckpt", tmp_path)
    callback = StrategyCallback(strategy=strategy)
    with_callback = lightning_resume(path, tmp_path, [callback])
    reloaded = lightning_resume(path, tmp_path)
    assert callback.actions == [{strategy: 10}]  # every parameter of net; the critic is not in the optimizer
    for name, value in plain.items():
        torch.testing.assert_close(with_callback[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(reloaded[n], v) for n, v in plain.items())


# ---------------------------------------------------------------- the harness running the user's trainer
def trainer_mode_ablation(tmp_path, task):
    from ostate.harness import ResultsStore, Spec, Sweep, run

    spec = Spec(
        task,
        Sweep(strategies=["reset-v", "reload"], seeds=[0], steps=1, eval_every=1),
        store=tmp_path / "r.sqlite",
        out=None,
        workers=1,
        progress=False,
    )
    results = run(spec)
    assert results.ran == 2 and not results.failed, results.failed
    # the cells are labelled with the sweep's lr and batch size, which the user's trainer may not follow
    assert results.summary is not None and "the trials ran under the task's own" in results.summary.warnings[0]
    records = ResultsStore(spec.store).records()
    return records.merge(ResultsStore(spec.store).trials()[["trial_id", "strategy"]], on="trial_id")


def first_update_rms(before: dict, after: dict) -> float:
    total = sum(float((after[n] - before[n]).double().square().sum()) for n in after)
    return (total / sum(v.numel() for v in after.values())) ** 0.5


def value(records, strategy, metric, step, group=-1):
    rows = records[
        (records.strategy == strategy) & (records.metric == metric) & (records.step == step) & (records.grp == group)
    ]
    assert len(rows) == 1, (strategy, metric, step)
    return float(rows.value.iloc[0])


@pytest.mark.slow
def test_the_harness_runs_trials_with_the_users_trainer_and_steps_as_ostate_reset(gpt2_run, tmp_path):
    from transformers import Trainer

    from ostate.harness import trainer_task
    from tests.helpers.builders import RandomTokens, tiny_gpt2, trainer_arguments

    ids = RandomTokens(64).ids[:8]

    def evaluate(model):
        return float(model(input_ids=ids, labels=ids).loss)

    def make_trainer(config, callbacks):
        torch.manual_seed(0)
        args = trainer_arguments(tmp_path / f"run-{config.strategy}", 8, save_strategy="steps", seed=config.seed)
        return Trainer(model=tiny_gpt2(), args=args, train_dataset=RandomTokens(64), callbacks=callbacks)

    records = trainer_mode_ablation(
        tmp_path, trainer_task("gpt2-trainer", make_trainer, evaluate, gpt2_run.checkpoint, kind="hf")
    )
    reset(gpt2_run.checkpoint, tmp_path / "reset", "reset-v")
    plain = resume_trainer(tmp_path / "reset", tmp_path / "plain")
    model = tiny_gpt2()
    model.load_state_dict(plain, strict=False)
    model.tie_weights()
    model.eval()
    with torch.no_grad():
        assert value(records, "reset-v", "eval_loss", 1) == pytest.approx(evaluate(model), rel=1e-6)
    from safetensors.torch import load_file

    before = load_file(gpt2_run.checkpoint / "model.safetensors")
    assert value(records, "reset-v", "update_rms", 1) == pytest.approx(
        first_update_rms({n: before[n] for n in plain if n in before}, {n: plain[n] for n in plain if n in before}),
        rel=1e-5,
    )
    assert value(records, "reset-v", "update_rms", 1) != value(records, "reload", "update_rms", 1)
    assert {"train_loss", "lr", "grad_rms", "eval_loss", "eff_lr_p50"} <= set(records.metric)


@pytest.mark.slow
def test_the_harness_runs_trials_with_the_users_lightning_trainer_and_steps_as_ostate_reset(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from ostate.harness import trainer_task
    from tests.test_lightning import Module, fit_and_save

    path, _ = fit_and_save(tmp_path)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))

    def evaluate(module):
        return float(module.net(x).square().mean())

    def make_trainer(config, callbacks):
        torch.manual_seed(0)
        trainer = L.Trainer(
            max_steps=8,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            default_root_dir=tmp_path,
            callbacks=callbacks,
        )
        return trainer, Module(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=16)

    records = trainer_mode_ablation(
        tmp_path, trainer_task("lightning-trainer", make_trainer, evaluate, path, kind="lightning")
    )
    reset(path, tmp_path / "reset.ckpt", "reset-v")
    plain = lightning_resume(tmp_path / "reset.ckpt", tmp_path)
    module = Module()
    module.load_state_dict(plain, strict=False)
    module.eval()
    with torch.no_grad():
        assert value(records, "reset-v", "eval_loss", 1) == pytest.approx(evaluate(module), rel=1e-6)
    before = torch.load(path, weights_only=False)["state_dict"]
    net = [n for n, _ in module.named_parameters() if n.startswith("net.")]
    assert value(records, "reset-v", "update_rms", 1) == pytest.approx(
        first_update_rms({n: before[n] for n in net}, {n: plain[n] for n in net}), rel=1e-5
    )
    assert {"train_loss", "lr", "grad_rms", "eval_loss"} <= set(records.metric)
