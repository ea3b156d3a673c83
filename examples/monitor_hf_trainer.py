"""Watch the optimizer state while the Hugging Face Trainer trains: ostate's MonitorCallback.

A tiny GPT-2 built from a config (nothing is downloaded) trains on random tokens; the
callback summarises the optimizer state every 5 steps, per layer, into
out/ostate_monitor.csv (and TensorBoard beside the Trainer's logs when installed). Then
the timeline is drawn from the log, and from the checkpoints the Trainer saved (the
same view for a run that had no monitor).

Run: python examples/monitor_hf_trainer.py
"""

from __future__ import annotations

import glob

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from ostate.figures import plot
from ostate.integrations.transformers import MonitorCallback
from ostate.monitor import read_log
from ostate.plots import save_figure


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int = 64, length: int = 16, count: int = 128):
        self.ids = torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
args = TrainingArguments(
    output_dir="out",
    max_steps=30,
    save_steps=10,
    per_device_train_batch_size=8,
    learning_rate=1e-3,
    lr_scheduler_type="constant_with_warmup",
    warmup_steps=5,
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
)
callback = MonitorCallback(every=5, by="layer")  # writer=TensorBoardWriter(args.logging_dir) for TensorBoard
Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[callback]).train()

log = read_log("out")
print(log[log["step"] == 30][["key", "eff_lr_p50", "update_to_weight_rms"]].to_string(index=False))
save_figure(plot("timeline", "out"), "timeline_log.png")
save_figure(plot("timeline", sorted(glob.glob("out/checkpoint-*")), by="layer"), "timeline_checkpoints.png")
print("wrote timeline_log.png (the monitor's log) and timeline_checkpoints.png (the saved checkpoints)")
