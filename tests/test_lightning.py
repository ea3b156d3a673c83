"""Checkpoints written by Lightning itself (Trainer.fit, then Trainer.save_checkpoint)."""

from __future__ import annotations

import pytest
import torch

import ostate
from tests.helpers.common import Net, run_cli

L = pytest.importorskip("lightning.pytorch")


class Module(L.LightningModule):
    def __init__(self, two_optimizers: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.net = Net()
        self.critic = torch.nn.Linear(3, 1)
        self.automatic_optimization = not two_optimizers

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.net(x).square().mean()
        if self.automatic_optimization:
            return loss
        opt_net, opt_critic = self.optimizers()
        opt_net.zero_grad()
        self.manual_backward(loss)
        opt_net.step()
        critic_loss = self.critic(self.net(x).detach()).square().mean()
        opt_critic.zero_grad()
        self.manual_backward(critic_loss)
        opt_critic.step()

    def configure_optimizers(self):
        net = torch.optim.AdamW(self.net.parameters(), lr=1e-3)
        if self.automatic_optimization:
            return {"optimizer": net, "lr_scheduler": torch.optim.lr_scheduler.StepLR(net, step_size=1)}
        return [net, torch.optim.SGD(self.critic.parameters(), lr=0.1, momentum=0.9)]


def fit_and_save(tmp_path, two_optimizers=False):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4))
    trainer = L.Trainer(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    module = Module(two_optimizers)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path, module


@pytest.mark.slow
def test_lightning_checkpoint_is_read_with_names_from_its_state_dict(tmp_path):
    path, module = fit_and_save(tmp_path)
    ckpt = ostate.load(path)
    assert ckpt.format == "lightning"
    assert ckpt.metadata["global_step"] == 4
    (o,) = ckpt.optimizers
    assert o.location == "optimizer_states[0]" and o.kind == "adamw"
    assert [p.name for p in o.params] == [f"net.{n}" for n, _ in module.net.named_parameters()]
    assert {p.name_source for p in o.params} == {"model-order"}
    assert ckpt.schedulers and ckpt.schedulers[0]["_location"] == "lr_schedulers[0]"
    torch.testing.assert_close(
        o.params[0].read("exp_avg"), module.optimizers().optimizer.state[module.net.inp.weight]["exp_avg"]
    )


@pytest.mark.slow
def test_lightning_checkpoint_with_two_optimizers_reports_both(tmp_path):
    path, module = fit_and_save(tmp_path, two_optimizers=True)
    ckpt = ostate.load(path)
    assert [(o.location, o.kind) for o in ckpt.optimizers] == [
        ("optimizer_states[0]", "adamw"),
        ("optimizer_states[1]", "sgd"),
    ]
    # Both optimizers are matched against the one state dict; each names its own parameters.
    assert [p.name for p in ckpt.optimizers[1].params] == ["critic.weight", "critic.bias"]
    result = run_cli("inspect", str(path), "--optimizer-index", "1", "--format", "json")
    assert result.returncode == 0, result.stderr
    import json

    data = json.loads(result.stdout)
    assert [o["location"] for o in data["optimizers"]] == ["optimizer_states[1]"]
