"""Write real DeepSpeed checkpoints on CPU, with the state DeepSpeed itself reports as ground truth.

Usage: python -m tests.helpers.deepspeed_train OUT [--fixtures] [CASE ...]  (from the repository root; needs deepspeed)

``--fixtures`` leaves out the recovery scripts DeepSpeed copies beside each save
(zero_to_fp32.py, zero_to_torch.py), for the small checkpoints committed under
tests/fixtures/deepspeed/ (written by ``python -m tests.helpers.deepspeed_train tests/fixtures/deepspeed
--fixtures fusedadam zero3_subgroups``).

Two ranks (torch.multiprocessing.spawn, gloo on 127.0.0.1) train a tiny model for
three steps once per case and save with ``engine.save_checkpoint(OUT/CASE, tag="global_step3")``.
Then every rank gathers each trainable parameter's full fp32 master weight and Adam
moments with DeepSpeed's own ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``,
and rank 0 writes them to ``OUT/CASE/ground_truth.pt``. The model has two param groups
(weights with decay, biases without and another lr), a frozen layer and a buffer.

Cases (:data:`CASES`): ZeRO stage 0-3, stage 3 split into several sub-groups,
the BF16_Optimizer, stage 2 with ``elastic_checkpoint``, and stage 2 with DeepSpeed's
own FusedAdam (``fusedadam``: builds a C++ op on first use, so not in the default set).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import torch
from torch import nn

WORLD_SIZE = 2
STEPS = 3
TAG = f"global_step{STEPS}"
LR = (1e-2, 5e-3)  # group 0 (weights, decay), group 1 (biases, no decay)

CASES = {
    "zero0": {"zero_optimization": {"stage": 0}},
    # bf16 without ZeRO: DeepSpeed's FP16_UnfusedOptimizer keeps fp32 master copies beside the model.
    "bf16_zero0": {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}},
    "zero1": {"zero_optimization": {"stage": 1}},
    "zero2": {"zero_optimization": {"stage": 2}},
    "zero3": {"zero_optimization": {"stage": 3}},
    # Sub-groups of at most 40 elements: the 91-element weight, the 15-element one and the
    # biases land in different sub-groups of the two param groups.
    "zero3_subgroups": {"zero_optimization": {"stage": 3, "sub_group_size": 40}},
    # DeepSpeed picks its BF16_Optimizer for bf16 + stage 1 + fp32 gradient accumulation.
    "bf16": {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
    "zero2_elastic": {"zero_optimization": {"stage": 2, "elastic_checkpoint": True}},
}
EXTRA_CASES = {"fusedadam": {"zero_optimization": {"stage": 2}, "torch_adam": False}}
DEFAULT_CASES = tuple(CASES)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(7, 13)  # 91 + 13
        self.frozen = nn.Linear(13, 5, bias=False)  # 65, requires_grad=False
        self.head = nn.Linear(5, 3)  # 15 + 3
        self.register_buffer("scale", torch.full((3,), 0.5))
        self.frozen.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.frozen(torch.relu(self.embed(x))))) * self.scale


def param_groups(model: nn.Module) -> list[dict]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in trainable if n.endswith("weight")], "weight_decay": 0.01, "lr": LR[0]},
        {"params": [p for n, p in trainable if n.endswith("bias")], "weight_decay": 0.0, "lr": LR[1]},
    ]


def config(case: str) -> dict:
    spec = dict({**CASES, **EXTRA_CASES}[case])
    torch_adam = spec.pop("torch_adam", True)
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10_000,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": LR[0], "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "torch_adam": torch_adam},
        },
        "zero_allow_untested_optimizer": True,
        **spec,
    }


def ground_truth(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Each trainable parameter's fp32 weight and Adam moments, as DeepSpeed gathers them (all ranks call this)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if engine.zero_optimization_stage() == 0:
        return unpartitioned_truth(engine.optimizer, engine.module)
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed 0.19 on CPU leaves ZeRO-1/2's links from parameters to optimizer state
        # fragments unset after a step; rebuild them so the gather below finds exp_avg.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        out[name] = {"fp32": safe_get_full_fp32_param(p).detach().clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            out[name][key] = safe_get_full_optimizer_state(p, key).detach().clone()
    return out


def unpartitioned_truth(opt, module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Without ZeRO: the torch optimizer's own state, through the FP16_UnfusedOptimizer's masters when bf16."""
    masters = {}
    if hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer: model and master parameters side by side
        for model_group, master_group in zip(opt.fp16_groups, opt.fp32_groups):
            masters.update({id(p): m for p, m in zip(model_group, master_group)})
        opt = opt.optimizer
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            master = masters.get(id(p), p)
            out[name] = {
                "fp32": master.detach().clone(),
                **{k: opt.state[master][k].clone() for k in ("exp_avg", "exp_avg_sq")},
            }
    return out


def gloo_only() -> None:
    """Keep DeepSpeed from building and mapping its CPU shared-memory all-reduce: the ranks talk through gloo alone.

    That op (a C++ extension built at start-up) is a speed path with no bearing on the
    checkpoint layout; one of its ranks once aborted at start-up in CI ("terminate called
    without an active exception"). The stub goes on the module itself: the attribute
    ``deepspeed.comm.torch`` is the ``torch`` package (``deepspeed.comm`` imports it by
    that name), so patching it there left the op built.
    """
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def start_rank(rank: int, world_size: int, port: int) -> None:
    """In a spawned process: become rank ``rank`` of ``world_size`` on 127.0.0.1:``port``,
    DeepSpeed's process group over gloo alone (:func:`gloo_only`)."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    import deepspeed

    gloo_only()
    deepspeed.init_distributed(dist_backend="gloo")


def worker(rank: int, world_size: int, port: int, out: str, cases: list[str]) -> None:
    start_rank(rank, world_size, port)
    import deepspeed
    import deepspeed.comm as dist

    for case in cases:
        torch.manual_seed(0)
        model = TinyNet()
        cfg = config(case)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=cfg)
        dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(STEPS):
            x, y = torch.randn(4, 7, generator=g).to(dtype), torch.randn(4, 3, generator=g)
            loss = (engine(x).float() - y).square().mean()
            engine.backward(loss)
            engine.step()
        run_dir = os.path.join(out, case)
        engine.save_checkpoint(run_dir, tag=TAG)
        truth = ground_truth(engine)
        if rank == 0:
            torch.save(truth, os.path.join(run_dir, "ground_truth.pt"))
        dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> None:
    out, rest = argv[0], argv[1:]
    fixtures = "--fixtures" in rest
    cases = [a for a in rest if a != "--fixtures"] or list(DEFAULT_CASES)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Private build folder for DeepSpeed's C++ ops: see tests/test_deepspeed.py.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="ostate-torch-ext-"))
    torch.multiprocessing.spawn(worker, args=(WORLD_SIZE, free_port(), out, cases), nprocs=WORLD_SIZE, join=True)
    if fixtures:
        for case in cases:
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                path = os.path.join(out, case, script)
                if os.path.exists(path):
                    os.remove(path)


if __name__ == "__main__":
    main(sys.argv[1:])
