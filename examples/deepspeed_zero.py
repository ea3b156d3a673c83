"""Train a tiny model with DeepSpeed ZeRO-2 on two CPU processes, then read its sharded optimizer state.

Run: python examples/deepspeed_zero.py [WORKDIR]

Needs DeepSpeed to *write* the checkpoint (pip install deepspeed); without it the
example says so and stops. ostate reads DeepSpeed checkpoints without DeepSpeed.
The first DeepSpeed start on a machine compiles a small C++ op (about half a minute).
"""

from __future__ import annotations

import os
import socket
import sys

import torch
from torch import nn

import ostate


def train(rank: int, world_size: int, port: int, save_dir: str) -> None:
    """One data-parallel rank: ZeRO-2 with AdamW over two param groups, 20 steps, then save."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 4))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10_000,
    }
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    g = torch.Generator().manual_seed(rank)
    for _ in range(20):
        x = torch.randn(8, 16, generator=g)
        loss = (engine(x) - x[:, :4]).square().mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(save_dir)  # save_dir/latest -> global_step20/, one optimizer file per rank


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401  (only to write the checkpoint)
    except ImportError:
        print("DeepSpeed is not installed: this example needs it to write a checkpoint (pip install deepspeed).")
        return
    workdir = sys.argv[1] if len(sys.argv) > 1 else "ostate-deepspeed"
    save_dir = os.path.join(workdir, "checkpoints")
    # DeepSpeed builds a small C++ op on first use on CPU; a private build folder keeps a lock
    # left by some earlier, killed build in ~/.cache/torch_extensions from blocking this run.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(os.path.join(workdir, "torch_extensions")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(train, args=(2, port, save_dir), nprocs=2, join=True)

    checkpoint = ostate.load(save_dir)  # follows 'latest'; joins both ranks' partitions
    meta = checkpoint.metadata
    print(
        f"{checkpoint.format} checkpoint, tag {meta['tag']}: ZeRO stage {meta['zero_stage']}, "
        f"{meta['dp_world_size']} ranks, DeepSpeed {meta['ds_version']}"
    )
    for group in ostate.describe(checkpoint.optimizers[0])["groups"]:
        hp = group["hyperparameters"]
        print(f"group {group['index']}: {group['params']} params, lr={hp['lr']}, weight_decay={hp['weight_decay']}")

    table = ostate.analyze(checkpoint)
    print(table[["name", "group", "shape", "step", "exp_avg_sq_mean", "eff_lr_p50"]].to_string(index=False))

    # The fp32 master weights are the real weights under ZeRO.
    head = checkpoint.weights["3.weight"].read()
    print(f"3.weight master copy: {tuple(head.shape)} {head.dtype}, norm {head.norm():.4f}")


if __name__ == "__main__":
    main()
