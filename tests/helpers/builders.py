"""Checkpoints written by the real libraries: transformers' Trainer, accelerate, torch.distributed.checkpoint.

Each builder trains a tiny model for a few steps and saves it the way the library
does, and returns what the test needs as the oracle: the optimizer state loaded the
plain way and the true parameter names, read from the live optimizer's own param
groups (not inferred).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


# ---------------------------------------------------------------- transformers' Trainer
@dataclass
class TrainerRun:
    output_dir: Path
    checkpoint: Path  # the last checkpoint-N/
    model: nn.Module
    names: list[str]  # the optimizer's parameters in index order, from the live optimizer
    global_step: int
    last_lr: list[float]


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, length: int = 16, count: int = 32):
        self.ids = torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    )


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def trainer_arguments(output_dir, max_steps: int, **changes: Any):
    """The ``TrainingArguments`` of the tests' tiny Trainer runs: CPU, batch 4, AdamW at lr 1e-3 with
    weight decay 0.1, one warmup step then linear decay, seed 0, no checkpoints, no reports (``changes``
    replace any of them)."""
    from transformers import TrainingArguments

    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
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
    return TrainingArguments(**{**settings, **changes})


def train_with_trainer(
    output_dir: Path,
    model: nn.Module,
    *,
    steps: int = 4,
    save_steps: int = 2,
    freeze: tuple[str, ...] = (),
    trainer_class: Any = None,
    callbacks: list | None = None,
) -> TrainerRun:
    """A real ``transformers.Trainer`` run on random tokens that writes ``checkpoint-N/`` every ``save_steps``."""
    from transformers import Trainer

    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if name in freeze:
            p.requires_grad_(False)
    args = trainer_arguments(output_dir, steps + 4, save_strategy="steps", save_steps=save_steps, logging_steps=1)
    trainer = (trainer_class or Trainer)(model=model, args=args, train_dataset=RandomTokens(64), callbacks=callbacks)
    trainer.add_callback(_stop_after(steps))
    trainer.train()
    by_param = {id(p): n for n, p in model.named_parameters()}
    names = [by_param[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]
    return TrainerRun(
        output_dir,
        output_dir / f"checkpoint-{steps}",
        model,
        names,
        trainer.state.global_step,
        list(trainer.lr_scheduler.get_last_lr()),
    )


def _stop_after(steps: int):
    """A callback that stops training after ``steps`` steps (max_steps is larger, so the schedule's lr is not 0)."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= steps:
                control.should_training_stop = True
            return control

    return StopAfter()


def legacy_trainer_class():
    """A Trainer whose decay rule is that of transformers < 4.49.

    As in transformers 4.48.0 ``trainer.py``::

        decay_parameters = get_parameter_names(model, ALL_LAYERNORM_LAYERS)
        decay_parameters = [name for name in decay_parameters if "bias" not in name]

    with ``ALL_LAYERNORM_LAYERS`` = ``[nn.LayerNorm]`` plus the model files' own norm
    classes (none for Qwen2, whose ``Qwen2RMSNorm`` was never appended to it).
    """
    from transformers import Trainer
    from transformers.trainer_pt_utils import get_parameter_names

    class LegacyDecayTrainer(Trainer):
        def get_decay_parameter_names(self, model):
            return [n for n in get_parameter_names(model, [nn.LayerNorm]) if "bias" not in n]

    return LegacyDecayTrainer


# ---------------------------------------------------------------- accelerate
@dataclass
class AccelerateRun:
    directory: Path
    bin_directory: Path  # the same state saved with safe_serialization=False
    names: list[list[str]]  # per optimizer, in index order
    optimizers: list[torch.optim.Optimizer]


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.inp(x))))


def save_with_accelerate(directory: Path) -> AccelerateRun:
    """``Accelerator.save_state`` of two models, two optimizers (AdamW and SGD) and a scheduler."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    generator, critic = Generator(), nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    names = [[n for n, _ in generator.named_parameters()], [n for n, _ in critic.named_parameters()]]
    gen_opt = torch.optim.AdamW(generator.parameters(), lr=1e-2, weight_decay=0.01)
    critic_opt = torch.optim.SGD(critic.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(gen_opt, step_size=1, gamma=0.5)
    accelerator = Accelerator(cpu=True)
    generator, critic, gen_opt, critic_opt, schedule = accelerator.prepare(
        generator, critic, gen_opt, critic_opt, schedule
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        loss = critic(generator(torch.randn(16, 4, generator=g))).square().mean()
        accelerator.backward(loss)
        gen_opt.step()
        critic_opt.step()
        gen_opt.zero_grad()
        critic_opt.zero_grad()
        schedule.step()
    accelerator.save_state(str(directory))
    accelerator.save_state(str(directory) + "-bin", safe_serialization=False)
    return AccelerateRun(directory, Path(str(directory) + "-bin"), names, [gen_opt.optimizer, critic_opt.optimizer])


# ---------------------------------------------------------------- torch.distributed.checkpoint
class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.blocks = nn.ModuleList([nn.Linear(6, 6) for _ in range(2)])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def mlp_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with a decay group (matrices) and a no-decay group (biases)."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-2)


def save_dcp_layouts(directory: Path, world_size: int) -> None:
    """Train ``Mlp`` on ``world_size`` gloo processes (FSDP2 when more than one) and save every DCP layout.

    Writes under ``directory``: ``nested/`` ({'model', 'optimizer'} from
    ``get_model_state_dict`` / ``get_optimizer_state_dict``), ``flat/`` (the same with
    ``flatten_optimizer_state_dict=True``), ``torchtitan/`` (model FQNs at the top
    level, the flattened optimizer, ``lr_scheduler``, ``train_state``, as
    torchtitan's ``CheckpointManager`` saves: ``torchtitan/components/checkpoint.py``,
    ``_flattened_model_states_sd`` and ``TrainState.state_dict``), ``accelerate/`` (an
    FSDP ``save_state``: ``optimizer_0/`` holding ``{"optimizer": ...}`` as
    ``accelerate/utils/fsdp_utils.py::save_fsdp_optimizer`` writes it), and
    ``oracle.pt``: the full, unsharded optimizer state dict gathered by torch
    (``full_state_dict=True``), the plain way to load it.
    """
    import torch.multiprocessing as mp

    directory.mkdir(parents=True, exist_ok=True)
    mp.spawn(_dcp_worker, args=(world_size, str(directory)), nprocs=world_size, join=True)


def _dcp_worker(rank: int, world_size: int, directory: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    dist.init_process_group("gloo", init_method=f"file://{directory}/.store", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = Mlp()
        if world_size > 1:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        optimizer = mlp_optimizer(model)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        g = torch.Generator().manual_seed(rank + 1)
        for _ in range(3):
            model(torch.randn(8, 4, generator=g)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        model_sd = get_model_state_dict(model)
        dcp.save(
            {"model": model_sd, "optimizer": get_optimizer_state_dict(model, optimizer)},
            checkpoint_id=os.path.join(directory, "nested"),
        )
        dcp.save(
            {"model": model_sd, "optimizer": get_optimizer_state_dict(model, optimizer, options=flat)},
            checkpoint_id=os.path.join(directory, "flat"),
        )
        titan = dict(model_sd)
        titan.update(
            {
                "optimizer": get_optimizer_state_dict(model, optimizer, options=flat),
                "lr_scheduler": schedule.state_dict(),
                "train_state": {"step": torch.tensor(3, dtype=torch.int32)},
            }
        )
        dcp.save(titan, checkpoint_id=os.path.join(directory, "torchtitan", "step-3"))
        dcp.save(
            {"optimizer": get_optimizer_state_dict(model, optimizer)},
            storage_writer=dcp.FileSystemWriter(os.path.join(directory, "accelerate", "optimizer_0")),
        )
        full = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            torch.save({"optimizer": full, "lr": schedule.get_last_lr()}, os.path.join(directory, "oracle.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every file is written. The process's own teardown can still abort in gloo's threads
    # ("terminate called without an active exception", 1 run in 10 to 20 here), so leave
    # without it; an exception above skips this and reaches mp.spawn as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- comparing with the plain load
def assert_same_state(optimizer_state: Any, plain: dict[str, dict[str, Any]]) -> None:
    """Every parameter's state read by ostate equals the plain-loaded state under the same (true) name."""
    assert {p.name for p in optimizer_state.params if p.has_state} == set(plain)
    for p in optimizer_state.params:
        if not p.has_state:
            continue
        expected = plain[p.name]
        assert set(p.state) == set(expected), p.name
        for key, value in expected.items():
            got = p.read(key)
            if isinstance(value, torch.Tensor):
                assert got.dtype == value.dtype and torch.equal(got, value), (p.name, key)
            else:
                assert float(got) == float(value), (p.name, key)


def by_name(state_dict: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """A torch optimizer state dict's per-parameter state keyed by the true names (index order)."""
    ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
    return {names[i]: state_dict["state"][pid] for i, pid in enumerate(ids) if pid in state_dict["state"]}
