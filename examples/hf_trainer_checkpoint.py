"""Train a tiny GPT-2 with the Hugging Face Trainer, then inspect the checkpoint directory it saved.

The model is built from a config (nothing is downloaded) and trained for a few steps
on random tokens; the Trainer writes out/checkpoint-4/ (optimizer.pt, scheduler.pt,
trainer_state.json, model.safetensors, config.json). ostate names every optimizer
parameter by rebuilding the model's order from config.json and the Trainer's
decay / no-decay grouping. Needs transformers (pip install 'ostate[hf]').

Run: python examples/hf_trainer_checkpoint.py [WORKDIR]
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import ostate
from ostate.report import inspect, render

workdir = sys.argv[1] if len(sys.argv) > 1 else "hf-trainer-demo"


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 64, length: int = 16, vocab: int = 64):
        self.ids = torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAfter(TrainerCallback):
    """Stop at step 4 of a schedule planned for 8, so the saved lr is mid-schedule."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= 4
        return control


torch.manual_seed(0)
model = GPT2LMHeadModel(
    GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
)
args = TrainingArguments(
    output_dir=os.path.join(workdir, "out"),
    max_steps=8,
    save_steps=4,
    learning_rate=1e-3,
    weight_decay=0.1,
    warmup_steps=1,
    per_device_train_batch_size=8,
    logging_steps=1,
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)
Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[StopAfter()]).train()

checkpoint_dir = os.path.join(workdir, "out", "checkpoint-4")
print(f"\nthe Trainer saved {checkpoint_dir}: {', '.join(sorted(os.listdir(checkpoint_dir)))}\n")

checkpoint = ostate.load(checkpoint_dir)  # recognised as a Trainer checkpoint from its files
optimizer = checkpoint.optimizers[0]
print(
    f"format {checkpoint.format}, global step {checkpoint.metadata['global_step']}, "
    f"decay rule {optimizer.extra['decay_rule']}"
)
print(render(inspect(checkpoint, by="layer")))

# Which parameters did the Trainer exclude from weight decay? (group 1: weight_decay=0)
no_decay = [p.name for p in optimizer.params if optimizer.groups[p.group]["weight_decay"] == 0]
print(f"no weight decay ({len(no_decay)}): {', '.join(no_decay[:6])}, ...")
