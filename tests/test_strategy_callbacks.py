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
    from transformers import Trainer, TrainingArguments

    from tests.helpers.builders import RandomTokens, tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2()
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=5,  # the checkpoint is at step 4
        save_strategy="no",
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.1,
        warmup_steps=1,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
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
    return {n: p.detach().clone() for n, p in module.named_parameters()}


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
