"""Write Megatron distributed-optimizer checkpoints (``iter_*/mp_rank_00/{model_optim_rng,distrib_optim}.pt``).

Megatron's distributed optimizer needs CUDA (its grad buffers are allocated on
``torch.cuda.current_device()``), so it cannot run here. These files reproduce what it
writes, from its source (megatron-core 0.16.1), independently of ostate's reader:

- the grad buffer layout follows ``_ParamAndGradBuffer.__init__`` line by line: parameters
  in reverse order, starts padded to 64, buckets closed at ``bucket_size`` and their ends
  padded to ``lcm(dp, 128)``, absolute indices into the padded buffer;
- ``distrib_optim.pt`` is ``get_parameter_state_dp_zero``'s result: per buffer and key, each
  bucket's ``[:numel_unpadded]`` joined (the gather over DP ranks restores the whole bucket),
  ``numel_unpadded``, and ``buckets_coalesced``; ``legacy=True`` writes the pre-2024 list of
  per-bucket tensors instead;
- ``model_optim_rng.pt`` is Megatron-LM's ``generate_state_dict``: ``args`` (an
  ``argparse.Namespace``), ``checkpoint_version``, ``iteration``, ``model``, ``optimizer``
  (``DistributedOptimizer.state_dict``: param groups without ``params``, with ``step``),
  ``opt_param_scheduler`` and ``rng_state``.

``save_torch_dist`` (run as ``python -m tests.helpers.megatron_ckpt OUT``) instead saves a real
megatron-core ``GPTModel`` with megatron's own ``dist_checkpointing.save`` (torch_dist).

The model has the parameter names of megatron-core's ``GPTModel`` with its local layer spec;
the optimizer is the real ``torch.optim.AdamW`` (what megatron uses without Apex/TE), with
Megatron's default groups (biases and 1-D parameters with ``wd_mult`` 0).
"""

from __future__ import annotations

import argparse
import math
import os
import random

import torch
from torch import nn

H, V, S, LAYERS = 8, 16, 6, 2


def tiny_gpt() -> nn.Module:
    """A module tree with megatron-core GPTModel's parameter names (local spec, untied output layer)."""

    def linear(i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o)

    def norm() -> nn.LayerNorm:
        return nn.LayerNorm(H)

    model = nn.Module()
    model.embedding = nn.Module()
    model.embedding.word_embeddings = nn.Embedding(V, H)
    model.embedding.position_embeddings = nn.Embedding(S, H)
    model.decoder = nn.Module()
    layers = nn.ModuleList()
    for _ in range(LAYERS):
        layer = nn.Module()
        layer.input_layernorm = norm()
        layer.self_attention = nn.Module()
        layer.self_attention.linear_qkv = linear(H, 3 * H)
        layer.self_attention.linear_proj = linear(H, H)
        layer.pre_mlp_layernorm = norm()
        layer.mlp = nn.Module()
        layer.mlp.linear_fc1 = linear(H, 4 * H)
        layer.mlp.linear_fc2 = linear(4 * H, H)
        layers.append(layer)
    model.decoder.layers = layers
    model.decoder.final_layernorm = norm()
    model.output_layer = nn.Linear(H, V, bias=False)
    return model


def train(model: nn.Module, steps: int, lr: float = 1e-2, wd: float = 0.1) -> torch.optim.AdamW:
    """Megatron's default groups (optimizer/__init__.py::_get_param_groups) and ``steps`` AdamW steps."""
    named = list(model.named_parameters())
    no_wd = [p for n, p in named if len(p.shape) == 1 or n.endswith(".bias")]
    rest = [p for n, p in named if not (len(p.shape) == 1 or n.endswith(".bias"))]
    common = {"lr_mult": 1.0, "is_expert_parallel": False, "default_config": True, "max_lr": lr, "min_lr": 0.0}
    opt = torch.optim.AdamW(
        [
            {"params": rest, "wd_mult": 1.0, "weight_decay": wd, **common},
            {"params": no_wd, "wd_mult": 0.0, "weight_decay": 0.0, **common},
        ],
        lr=lr,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((p - torch.randn(p.shape, generator=gen)) ** 2).sum() for _, p in named)
        loss.backward()
        opt.step()
    return opt


def buffer_layout(params: list[torch.Tensor], dp: int, bucket_size: int | None):
    """``_ParamAndGradBuffer.__init__`` (use_distributed_optimizer=True): param_index_map, bucket_indices, unpadded sizes."""

    def _pad(n: int, divisor: int) -> int:
        return int(math.ceil(n / divisor) * divisor)

    param_index_map = {}
    bucket_indices = []
    per_bucket_numel_unpadded = []
    param_start_index = 0
    bucket_start_index = 0
    bucket_params: set = set()
    param_end_index = 0

    def update_bucket(end: int) -> int:
        nonlocal bucket_start_index, bucket_params
        per_bucket_numel_unpadded.append(end - bucket_start_index)
        bucket_end_index = _pad(end, math.lcm(dp, 128))
        bucket_indices.append((bucket_start_index, bucket_end_index))
        bucket_start_index = bucket_end_index
        bucket_params = set()
        return bucket_end_index

    for param in params[::-1]:
        this_numel = param.data.nelement()
        param_start_index = _pad(param_start_index, 64)
        param_end_index = param_start_index + this_numel
        param_index_map[param] = (param_start_index, param_end_index)
        bucket_params.add(param)
        if bucket_size is not None and (param_end_index - bucket_start_index) >= bucket_size:
            param_start_index = update_bucket(param_end_index)
        else:
            param_start_index = param_end_index
    if bucket_params:
        update_bucket(param_end_index)
    return param_index_map, bucket_indices, per_bucket_numel_unpadded


def parameter_state(model: nn.Module, opt: torch.optim.Optimizer, dp: int, bucket_size: int | None, legacy: bool):
    """``get_parameter_state_dp_zero`` for one fp32 buffer."""
    params = [p for p in model.parameters() if p.requires_grad]
    index, buckets, unpadded = buffer_layout(params, dp, bucket_size)
    numel = buckets[-1][1]
    world: dict = {}
    for key in ("param", "exp_avg", "exp_avg_sq"):
        padded = torch.zeros(numel)
        for p, (start, end) in index.items():
            padded[start:end] = (p.data if key == "param" else opt.state[p][key]).reshape(-1)
        pieces = [padded[s : s + n].clone() for (s, _), n in zip(buckets, unpadded)]
        world[key] = pieces if legacy else torch.cat(pieces)
    if legacy:
        return {0: {torch.float32: world}, "per_bucket_numel_unpadded": [{torch.float32: unpadded}]}
    world["numel_unpadded"] = sum(unpadded)
    return {"buckets_coalesced": True, 0: {(torch.float32, torch.float32): world}}


def optimizer_state_dict(opt: torch.optim.Optimizer) -> dict:
    """``DistributedOptimizer.state_dict`` (no Apex/TE): the groups without params, each with the common step."""
    inner = opt.state_dict()
    step = {s["step"].item() for s in inner["state"].values()}.pop()
    groups = [dict({k: v for k, v in g.items() if k != "params"}, step=step) for g in inner["param_groups"]]
    return {"optimizer": {"param_groups": groups}}


def write(
    save_dir: str,
    *,
    steps: int = 3,
    dp: int = 2,
    bucket_size: int | None = None,
    legacy: bool = False,
    bf16: bool = False,
) -> tuple[nn.Module, torch.optim.AdamW, str]:
    """Train the tiny model and save it as Megatron-LM does; returns the model, optimizer and rank folder."""
    torch.manual_seed(0)
    model = tiny_gpt()
    opt = train(model, steps)
    rank_dir = os.path.join(save_dir, f"iter_{steps:07d}", "mp_rank_00")
    os.makedirs(rank_dir, exist_ok=True)
    args = argparse.Namespace(hidden_size=H, num_layers=LAYERS, use_distributed_optimizer=True, lr=1e-2)
    rng = {
        "random_rng_state": random.getstate(),
        "torch_rng_state": torch.get_rng_state(),
    }
    torch.save(
        {
            "args": args,
            "checkpoint_version": 3.0,
            "iteration": steps,
            # bf16 training: the model holds bf16 weights, the optimizer fp32 master copies of them
            "model": {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()} if bf16 else model.state_dict(),
            "optimizer": optimizer_state_dict(opt),
            "opt_param_scheduler": {"max_lr": 1e-2, "num_steps": steps, "lr_decay_style": "constant"},
            "rng_state": [rng],
        },
        os.path.join(rank_dir, "model_optim_rng.pt"),
    )
    state = parameter_state(model, opt, dp, bucket_size, legacy)
    if bf16:  # buffers are keyed (param_dtype, grad_dtype)
        state[0] = {(torch.bfloat16, torch.float32): state[0][(torch.float32, torch.float32)]}
    torch.save(state, os.path.join(rank_dir, "distrib_optim.pt"))
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(steps))
    return model, opt, rank_dir


def save_torch_dist(out: str, steps: int = 3) -> None:
    """Save a real megatron-core ``GPTModel`` with ``dist_checkpointing.save`` (torch_dist backend, gloo, one rank).

    The model is megatron-core's ``GPTModel`` (local layer spec, ``LAYERS`` layers, built on
    the CPU), trained ``steps`` AdamW steps with Megatron's default groups. The sharded state
    dict is what Megatron-LM saves with ``DistributedOptimizer.sharded_state_dict
    (sharding_type='fully_sharded_model_space')`` and one data-parallel rank: the model's own
    ``sharded_state_dict()`` (its TransformerBlock stacks the layers: one key per module,
    ``prepend_axis_num=1``), and for each parameter ``optimizer.state.<key>.<sharded key>``
    made by ``dataclasses.replace`` of the model's ShardedTensor (the flattened range of one
    rank covers the whole parameter, so it is saved unflattened here); the optimizer's
    ``state_dict()``, the iteration and Megatron-LM's ``args`` go to common.pt.

    The truth is saved to ``OUT.truth.pt``: per parameter (named as ``model.named_parameters``)
    its sharded key, its layer (``None`` for unstacked keys), its group's weight decay, the
    weight (``fp32_param``) and the AdamW moments.
    """
    import dataclasses

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    # megatron's saver calls torch.cuda.synchronize() and puts a status flag on torch.cuda.current_device();
    # with CPU-only torch these become a no-op and the CPU (gloo broadcasts CPU tensors).
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    config = TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=2, use_cpu_initialization=True)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=V, max_sequence_length=S)
    opt = train(model, steps)
    sharded = model.sharded_state_dict()
    param_state: dict = {}
    truth: dict = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        sh = sharded[name]
        tensors = {"fp32_param": p.detach().clone(), **{k: opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")}}
        param_state[i] = {
            k: dataclasses.replace(sh, key=f"optimizer.state.{k}.{sh.key}", data=t, dtype=t.dtype)
            for k, t in tensors.items()
        }
        layer = sh.global_offset[0] if sh.prepend_axis_num else None
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        truth[name] = {"key": sh.key, "layer": layer, "weight_decay": group["weight_decay"], **tensors}
    state = {
        "model": sharded,
        "optimizer": {
            **optimizer_state_dict(opt),
            "param_state": param_state,
            "param_state_sharding_type": "fully_sharded_model_space",
        },
        "iteration": steps,
        "checkpoint_version": 3.0,
        "args": argparse.Namespace(num_layers=LAYERS, hidden_size=H, use_distributed_optimizer=True, lr=1e-2),
        "opt_param_scheduler": {"max_lr": 1e-2, "num_steps": steps, "lr_decay_style": "constant"},
    }
    os.makedirs(out, exist_ok=True)
    dist_checkpointing.save(state, out)
    torch.save(truth, f"{out}.truth.pt")
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing writes through worker processes (spawn): keep this guard
    import sys

    save_torch_dist(sys.argv[1])
