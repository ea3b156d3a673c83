"""A Hugging Face checkpoint folder as users have it, made offline: a tokenizer trained on the spot,
a tiny GPT-2 built from a config, trained by the real ``transformers.Trainer`` with the
tokenizer saved beside it, and text files of two domains (Python source, English help text)."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch


def english(start: int = 0, chars: int = 20_000) -> str:
    """English prose that ships with Python: the interpreter's help topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[start : start + chars]


def python_code(chars: int = 20_000) -> str:
    """Python source code that ships with Python."""
    import argparse

    return inspect.getsource(argparse)[:chars]


def train_tokenizer(directory: Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on both domains, saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([python_code(), english()], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: list[int], block: int):
        n = len(ids) // block
        self.ids = torch.tensor(ids[: n * block]).view(n, block)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@dataclass
class HFFolder:
    output_dir: Path
    checkpoint: Path
    train: Path
    eval: Path
    source_eval: Path


def make_hf_folder(directory: Path, *, steps: int = 6, tokenizer_in_checkpoint: bool = True) -> HFFolder:
    """Pretrain a tiny GPT-2 on Python code with the Trainer; write target (English) train/eval files."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    tok = train_tokenizer(directory / "tokenizer")
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    ids = tok(python_code())["input_ids"]
    args = TrainingArguments(
        output_dir=str(directory / "out"),
        max_steps=steps,
        save_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.1,
        adam_beta2=0.95,
        warmup_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        logging_steps=steps,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Blocks(ids, 32),
        processing_class=tok if tokenizer_in_checkpoint else None,
    )
    trainer.train()
    files = {}
    for name, text in (
        ("train.txt", english(0, 12_000)),
        ("eval.txt", english(12_000, 4_000)),
        ("source-eval.txt", python_code(30_000)[-4_000:]),
    ):
        path = directory / name
        path.write_text(text)
        files[name] = path
    jsonl = directory / "train.jsonl"
    with open(jsonl, "w") as f:
        for paragraph in english(0, 12_000).split("\n\n"):
            if paragraph.strip():
                f.write(json.dumps({"text": paragraph}) + "\n")
    return HFFolder(
        directory / "out",
        directory / "out" / f"checkpoint-{steps}",
        files["train.txt"],
        files["eval.txt"],
        files["source-eval.txt"],
    )


def classifier_folder(directory: Path) -> Path:
    """A GPT-2 sequence classifier (3 labels, named) saved with its tokenizer, and a .jsonl of labelled texts."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = train_tokenizer(directory)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=16,
        n_layer=1,
        n_head=2,
        num_labels=3,
        id2label={0: "code", 1: "prose", 2: "other"},
        label2id={"code": 0, "prose": 1, "other": 2},
        pad_token_id=tok.pad_token_id,
    )
    GPT2ForSequenceClassification(config).save_pretrained(directory)
    with open(directory / "labelled.jsonl", "w") as f:
        for i, line in enumerate(python_code(2_000).splitlines()[:12]):
            f.write(json.dumps({"text": line or "pass", "label": "code" if i % 2 else 2}) + "\n")
    return directory
