"""Your Hugging Face checkpoint as the source of an ablation: keep or reset the optimizer state?

What a user has is a Trainer's ``checkpoint-N/`` folder. Nothing can be downloaded here,
so this example makes one the way a Trainer run would: a byte-level BPE tokenizer is
trained on the spot, a tiny GPT-2 is built from a config and pretrained on Python code
(the standard library's ``argparse`` source) by the real ``transformers.Trainer``, which
saves the tokenizer into the checkpoint. Then, with no further code:

1. ``ostate ablate --source out/checkpoint-N --train ... --eval ... --source-eval ...``
   fine-tunes it on English (the interpreter's help text) under three strategies;
2. the same question with your own Trainer running each trial
   (``Trainer.train(resume_from_checkpoint=...)`` with ostate's ``StrategyCallback``):
   clipping, schedule and the rest are the Trainer's.

Runs in about a minute on a CPU; every file goes under ./hf-ablation-example.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import torch

OUT = "hf-ablation-example"
STEPS = 20  # pretraining steps: the checkpoint is checkpoint-20


def english(start: int, chars: int) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[start : start + chars]


def python_code() -> str:
    import argparse

    return inspect.getsource(argparse)


def make_checkpoint() -> str:
    """A tokenizer, a tiny GPT-2 from a config, a Trainer run on code: out/checkpoint-20/."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer, TrainingArguments

    checkpoint = os.path.join(OUT, "out", f"checkpoint-{STEPS}")
    if os.path.isdir(checkpoint):
        return checkpoint
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [python_code(), english(0, 40_000)],
        trainer=trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    ids = torch.tensor(tokenizer(python_code())["input_ids"])
    blocks = ids[: len(ids) // 64 * 64].view(-1, 64)
    data = [{"input_ids": b, "labels": b} for b in blocks]
    args = TrainingArguments(
        output_dir=os.path.join(OUT, "out"),
        max_steps=STEPS,
        save_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        adam_beta2=0.95,
        weight_decay=0.1,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=STEPS,
        seed=0,
    )
    Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=data, processing_class=tokenizer).train()
    return checkpoint


def write_text() -> dict[str, str]:
    files = {
        "train.txt": english(0, 30_000),
        "eval.txt": english(30_000, 6_000),
        "source-eval.txt": python_code()[-6_000:],
    }
    for name, text in files.items():
        with open(os.path.join(OUT, name), "w") as f:
            f.write(text)
    return {name: os.path.join(OUT, name) for name in files}


def with_the_cli(checkpoint: str, files: dict[str, str]) -> None:
    """1. No code: the model is rebuilt from config.json, the tokenizer is the checkpoint's."""
    command = [
        sys.executable,
        "-m",
        "ostate_cli.main",
        "ablate",
        "--source",
        checkpoint,
        "--train",
        files["train.txt"],
        "--eval",
        files["eval.txt"],
        "--source-eval",
        files["source-eval.txt"],
        "--strategies",
        "reload,fresh,reset-v",
        "--seeds",
        "0",
        "--steps",
        "8",
        "--eval-every",
        "4",
        "--lr",
        "1e-3",
        "--block-size",
        "64",
        "--workers",
        "1",
        "--no-plots",
        "--out",
        os.path.join(OUT, "ablation-cli"),
    ]
    print("$ ostate ablate --source", checkpoint, "--train train.txt --eval eval.txt ...")
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout)
    if done.returncode:
        sys.exit(done.stderr[-2000:])


def with_your_trainer(checkpoint: str, files: dict[str, str]) -> None:
    """2. Each trial is your Trainer resuming from the checkpoint, with ostate's StrategyCallback."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from ostate.harness import Spec, Sweep, run, trainer_task
    from ostate.harness.text import render_summary

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    ids = torch.tensor(tokenizer(open(files["train.txt"]).read())["input_ids"])
    train = [{"input_ids": b, "labels": b} for b in ids[: len(ids) // 64 * 64].view(-1, 64)]
    held_out = torch.tensor(tokenizer(open(files["eval.txt"]).read())["input_ids"])
    held_out = held_out[: len(held_out) // 64 * 64].view(-1, 64)[:16]

    def evaluate(model):
        return float(model(input_ids=held_out, labels=held_out).loss)

    def make_trainer(config, callbacks):
        """Your own Trainer: the harness adds its callbacks; the seed is the trial's."""
        args = TrainingArguments(
            output_dir=os.path.join(OUT, "trainer-runs"),
            max_steps=STEPS + 100,  # beyond the checkpoint's step; the harness stops after the trial's steps
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            max_grad_norm=1.0,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=config.seed,
        )
        model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
        return Trainer(model=model, args=args, train_dataset=train, callbacks=callbacks)

    task = trainer_task("gpt2-with-my-trainer", make_trainer, evaluate, checkpoint, kind="hf")
    spec = Spec(
        task,
        Sweep(strategies=["reload", "reset-v"], seeds=[0], steps=8, eval_every=4),
        store=os.path.join(OUT, "ablation-trainer", "results.sqlite"),
        out=None,
        workers=1,
        progress=False,
    )
    results = run(spec)
    print("with your Trainer (Trainer.train(resume_from_checkpoint=...) + StrategyCallback):")
    print(render_summary(results.summary))


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    checkpoint = make_checkpoint()
    files = write_text()
    with_the_cli(checkpoint, files)
    with_your_trainer(checkpoint, files)


if __name__ == "__main__":
    main()
