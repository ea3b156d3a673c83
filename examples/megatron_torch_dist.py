"""Save a tiny model's Adam state with megatron-core's dist_checkpointing (torch_dist), then read it with ostate.

Run: python examples/megatron_torch_dist.py [WORKDIR]

Needs megatron-core to *write* the checkpoint (pip install megatron-core); without it the
example says so and stops. ostate reads Megatron checkpoints without Megatron. The state
dict is the one Megatron's DistributedOptimizer gives with one data-parallel rank
('fully_sharded_model_space'): ``optimizer.state.<state key>.<parameter's sharded key>``.
The two layers are saved as megatron's TransformerBlock saves them, stacked under one key
per module (``decoder.layers.linear_fc1.weight``, shape ``(2, 64, 16)``); ostate shows
them one parameter per layer (``decoder.layers.0.linear_fc1.weight``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys

import torch
from torch import nn

import ostate


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.linear_fc1 = nn.Linear(16, 64)
        self.linear_fc2 = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear_fc2(torch.nn.functional.gelu(self.linear_fc1(self.norm(x))))


class TinyModel(nn.Module):
    """Residual MLP layers under ``decoder.layers`` (megatron's names), then an output layer."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(Layer() for _ in range(layers))
        self.output_layer = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.decoder.layers:  # type: ignore[union-attr]
            x = layer(x)
        return self.output_layer(x)


def save(out: str) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    # megatron's saver syncs CUDA and puts a status flag on the current CUDA device: on a CPU-only torch, the CPU.
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=0, world_size=1)

    torch.manual_seed(0)
    model = TinyModel(layers=2)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}], lr=3e-3)
    opt.param_groups[1]["weight_decay"] = 0.0
    for _ in range(20):
        x = torch.randn(8, 16)
        opt.zero_grad()
        (model(x) - x[:, :4]).square().mean().backward()
        opt.step()

    model_sd, param_state = {}, {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.startswith("decoder.layers."):  # TransformerBlock: layer number out of the key, a leading layer axis
            layer, _, rest = name[len("decoder.layers.") :].partition(".")
            key = f"decoder.layers.{rest}"
            sh = ShardedTensor.from_rank_offsets(
                key, p.detach(), (0, int(layer), 2), replica_id=(0, 0, 0), prepend_axis_num=1
            )
        else:
            key = name
            sh = ShardedTensor.from_rank_offsets(key, p.detach(), replica_id=(0, 0, 0))
        model_sd[name] = sh
        tensors = {
            "fp32_param": p.detach().clone(),
            "exp_avg": opt.state[p]["exp_avg"],
            "exp_avg_sq": opt.state[p]["exp_avg_sq"],
        }
        param_state[i] = {
            k: dataclasses.replace(sh, key=f"optimizer.state.{k}.{key}", data=t) for k, t in tensors.items()
        }
    step = int(opt.state[decay[0]]["step"])
    groups = [dict({k: v for k, v in g.items() if k != "params"}, step=step) for g in opt.state_dict()["param_groups"]]
    state = {
        "model": model_sd,
        "optimizer": {
            "optimizer": {"param_groups": groups},
            "param_state": param_state,
            "param_state_sharding_type": "fully_sharded_model_space",
        },
        "iteration": step,
        "args": argparse.Namespace(num_layers=2),  # Megatron-LM saves its args: the number of stacked layers
    }
    os.makedirs(out, exist_ok=True)
    dist_checkpointing.save(state, out)
    dist.destroy_process_group()


def main() -> None:
    try:
        import megatron.core  # noqa: F401  (only to write the checkpoint)
    except ImportError:
        print(
            "megatron-core is not installed: this example needs it to write a checkpoint (pip install megatron-core)."
        )
        return
    workdir = sys.argv[1] if len(sys.argv) > 1 else "ostate-megatron"
    save_dir = os.path.join(workdir, "checkpoints")
    save(os.path.join(save_dir, "iter_0000020"))
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("20")

    checkpoint = ostate.load(save_dir)  # follows latest_checkpointed_iteration.txt
    print(
        f"{checkpoint.format} ({checkpoint.metadata['megatron_format']}), iteration {checkpoint.metadata['global_step']}"
    )
    for warning in checkpoint.optimizers[0].warnings:
        print("note:", warning)
    table = ostate.analyze(checkpoint)
    print(table[["name", "group", "shape", "step", "exp_avg_sq_mean", "eff_lr_p50"]].to_string(index=False))
    print()
    print(ostate.analyze(checkpoint, by="layer")[["layer", "params", "exp_avg_sq_mean"]].to_string(index=False))


if __name__ == "__main__":
    main()
