"""Your Lightning checkpoint as the source of an ablation, with your LightningModule and your Trainer.

A small LightningModule is trained on one regression map and saved by Lightning
(``last.ckpt``: weights, AdamW state, scheduler). Then the question: fine-tuning it
on a nearby map, keep the optimizer state or reset it?

1. ``StrategyCallback`` alone: resume your own ``Trainer.fit(ckpt_path=...)`` with the
   strategy applied to the restored optimizer state (what you would do in production);
2. the harness running your Trainer for each trial (``trainer_task(kind="lightning")``),
   two strategies, one seed;
3. the same checkpoint with the harness's own loop (any checkpoint ostate reads is a source).

Runs in well under a minute on a CPU; every file goes under ./lightning-ablation-example.
"""

from __future__ import annotations

import os

import lightning.pytorch as L
import torch
from torch import nn

from ostate.harness import Spec, Sweep, Task, run, trainer_task
from ostate.harness.text import render_summary
from ostate.integrations.lightning import StrategyCallback

OUT = "lightning-ablation-example"
g = torch.Generator().manual_seed(0)
W_SOURCE = torch.randn(8, 1, generator=g)
W_TARGET = W_SOURCE + 0.5 * torch.randn(8, 1, generator=g)
X = torch.randn(512, 8, generator=g)
X_EVAL = torch.randn(256, 8, generator=g)


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self(x) - y).square().mean()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 50, 0.5)}


def loader(weights: torch.Tensor, seed: int = 0) -> torch.utils.data.DataLoader:
    data = torch.utils.data.TensorDataset(X, X @ weights)
    return torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))


def trainer(max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=OUT,
        callbacks=list(callbacks),
    )


def target_loss(module: nn.Module) -> float:
    with torch.no_grad():
        return float((module(X_EVAL) - X_EVAL @ W_TARGET).square().mean())


def make_checkpoint() -> str:
    path = os.path.join(OUT, "last.ckpt")
    if not os.path.exists(path):
        torch.manual_seed(0)
        source_trainer = trainer(100)
        source_trainer.fit(Regressor(), loader(W_SOURCE))
        source_trainer.save_checkpoint(path)
    return path


# The harness's trainer function: your Trainer with the callbacks it is given (module level, so
# trials could also run in worker processes).
def make_trainer(config, callbacks):
    torch.manual_seed(config.seed)
    return trainer(100 + 1000, callbacks), Regressor(), loader(W_TARGET, config.seed)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    checkpoint = make_checkpoint()

    # 1. Resume your own fit with a strategy applied to the restored optimizer state.
    torch.manual_seed(0)
    module, callback = Regressor(), StrategyCallback(strategy="reset-v")
    trainer(100 + 30, [callback]).fit(module, loader(W_TARGET), ckpt_path=checkpoint)
    print(f"StrategyCallback: {callback.actions[0]}; target loss after 30 steps {target_loss(module):.4f}")

    # 2. The harness runs your Trainer for each trial: Trainer.fit(ckpt_path=checkpoint).
    spec = Spec(
        trainer_task("regressor-lightning", make_trainer, target_loss, checkpoint, kind="lightning"),
        Sweep(strategies=["reload", "fresh"], seeds=[0], steps=30, eval_every=10),
        store=os.path.join(OUT, "trainer", "results.sqlite"),
        out=None,
        workers=1,
        progress=False,
    )
    print("\nwith your Lightning Trainer:")
    print(render_summary(run(spec).summary))

    # 3. The same checkpoint with the harness's own loop: the model's parts as plain callables.
    def batches(batch_size, generator):
        while True:
            x = torch.randn(batch_size, 8, generator=generator)
            yield x, x @ W_TARGET

    task = Task(
        "regressor-builtin-loop",
        model=Regressor,
        train_batches=batches,
        loss=lambda m, b: (m(b[0]) - b[1]).square().mean(),
        evaluate=target_loss,
        source=checkpoint,
    )
    spec = Spec(
        task,
        Sweep(strategies=["reload", "fresh"], seeds=[0, 1], steps=30, eval_every=10, lr=[5e-3]),
        store=os.path.join(OUT, "loop", "results.sqlite"),
        out=None,
        workers=1,
        progress=False,
    )
    print("with the harness's own loop:")
    print(render_summary(run(spec).summary))


if __name__ == "__main__":
    main()
