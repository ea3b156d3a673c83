"""A task from a Hugging Face checkpoint folder and text files: no code to write (``ostate ablate --source DIR --train ...``).

The model is rebuilt from the checkpoint's ``config.json`` (``AutoModelForCausalLM``, or
``AutoModelForSequenceClassification`` when the config's architecture is one: then the
task is classification), and the harness loads the checkpoint's weights and optimizer
state into it by name. The text is tokenized with the tokenizer saved in the checkpoint
folder or in the folder above it (where the ``Trainer`` saves it with ``output_dir``);
nothing is ever downloaded.

Data files: ``.txt`` (the whole file is one text) or ``.jsonl`` (one JSON object per
line with a ``text`` field, and a ``label`` for classification: an integer, or a name
of the config's ``label2id``). A causal LM trains on ``block_size``-token windows of
the texts joined by the end-of-text token; each step draws ``batch_size`` windows
at random (with the trial's seed). The eval loss is the mean loss over the first
:data:`EVAL_BLOCKS` windows (or texts) of the eval file; ``--source-eval`` adds the
same on source-domain text (how much of the source the fine-tuning forgets).

transformers is an optional extra (``pip install 'ostate[hf]'``).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ostate.errors import OstateError
from ostate.harness.source import fingerprint

EVAL_BLOCKS = 64
EVAL_BATCH = 8
DEFAULT_BLOCK_SIZE = 128
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


@dataclass(frozen=True)
class HFText:
    """The parts of the task (picklable: worker processes rebuild what they need from the paths)."""

    checkpoint: str
    train: str
    eval: str
    source_eval: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE

    def model(self) -> nn.Module:
        transformers = _transformers()
        config = _config(self.checkpoint)
        if not _classifier(config):
            return transformers.AutoModelForCausalLM.from_config(config)
        if config.pad_token_id is None:  # batches are padded: the model must know where each text ends
            _dataset(self.checkpoint, self.train, self.block_size)
            config.pad_token_id = tokenizer(self.checkpoint).pad_token_id
        return transformers.AutoModelForSequenceClassification.from_config(config)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        data = _dataset(self.checkpoint, self.train, self.block_size)
        while True:
            picks = torch.randint(0, len(data["input_ids"]), (batch_size,), generator=generator)
            yield {k: v[picks] for k, v in data.items()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(**{k: v.to(device) for k, v in batch.items()}).loss

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return _evaluate(model, _dataset(self.checkpoint, self.eval, self.block_size))

    def source_evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.source_eval is None:
            raise OstateError("no source-domain eval file was given", hint="--source-eval FILE")
        return _evaluate(model, _dataset(self.checkpoint, self.source_eval, self.block_size))


def hf_text_task(
    checkpoint: str | os.PathLike,
    train: str | os.PathLike,
    eval: str | os.PathLike,
    *,
    source_eval: str | os.PathLike | None = None,
    block_size: int | None = None,
    optimizer_index: int | None = None,
) -> Any:
    """The :class:`~ostate.harness.task.Task` fine-tuning the model of a Hugging Face checkpoint folder on text files.

    Everything is checked here, before any trial: the config, the tokenizer, the data
    files (a clear error naming the file otherwise).
    """
    from ostate.harness.task import Task

    checkpoint = os.fspath(checkpoint)
    config = _config(checkpoint)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    size = block_size or min(DEFAULT_BLOCK_SIZE, positions or DEFAULT_BLOCK_SIZE)
    if positions and size > positions:
        raise OstateError(
            f"block size {size} exceeds the model's {positions} positions", hint=f"--block-size {positions}"
        )
    parts = HFText(checkpoint, os.fspath(train), os.fspath(eval), os.fspath(source_eval) if source_eval else None, size)
    files = [parts.train, parts.eval] + ([parts.source_eval] if parts.source_eval else [])
    for path in files:
        _dataset(checkpoint, path, size)  # reads, tokenizes and checks each file once
    kind = "classification" if _classifier(config) else "causal-lm"
    task = Task(
        name=f"{os.path.basename(os.path.normpath(checkpoint))}-{kind}",
        model=parts.model,
        train_batches=parts.train_batches,
        loss=parts.loss,
        evaluate=parts.evaluate,
        source=checkpoint,
        source_optimizer=optimizer_index,
        fingerprint="-".join([fingerprint(p)[:8] for p in files] + [str(size)]),
        description=f"{kind} from {checkpoint}: {os.path.basename(parts.train)} -> {os.path.basename(parts.eval)}",
        defaults={"lr": 5e-5, "batch_size": 8, "steps": 200, "eval_every": 20},
    )
    if parts.source_eval:
        task.source_evaluate = parts.source_evaluate
    return task


def _transformers() -> Any:
    try:
        # optional dependency (ostate[hf])
        import transformers
    except ImportError:
        raise OstateError(
            "a Hugging Face checkpoint as a task needs transformers", hint="pip install 'ostate[hf]'"
        ) from None
    return transformers


@functools.lru_cache(maxsize=4)
def _config(checkpoint: str) -> Any:
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise OstateError(
            "no config.json, so the model cannot be rebuilt",
            where=checkpoint,
            hint="give a Hugging Face checkpoint folder (as Trainer.save_model or the Trainer's checkpoint-N/ "
            "writes it), or describe your own task in SPEC.toml",
        )
    try:
        return _transformers().AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise OstateError(f"config.json cannot be read by transformers: {e}", where=checkpoint) from None


def _classifier(config: Any) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])


@functools.lru_cache(maxsize=4)
def tokenizer(checkpoint: str) -> Any:
    """The tokenizer saved in ``checkpoint`` or in the folder above it; never a download."""
    parent = os.path.dirname(os.path.normpath(checkpoint))
    for folder in (checkpoint, parent):
        if any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
            try:
                return _transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except (ValueError, OSError, KeyError, TypeError) as e:
                raise OstateError(f"the tokenizer cannot be loaded: {e}", where=folder) from None
    raise OstateError(
        "no tokenizer in the checkpoint folder or the folder above it",
        where=checkpoint,
        hint="save it beside the weights (tokenizer.save_pretrained(DIR), or Trainer(processing_class=tokenizer)); "
        "nothing is downloaded",
    )


@functools.lru_cache(maxsize=8)
def _dataset(checkpoint: str, path: str, block_size: int) -> dict[str, torch.Tensor]:
    """A file's examples as tensors: ``input_ids`` and ``labels`` (and ``attention_mask`` for classification)."""
    config = _config(checkpoint)
    texts, labels = _read(path, classification=_classifier(config))
    tok = tokenizer(checkpoint)
    if _classifier(config):
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        encoded = tok(texts, truncation=True, max_length=block_size, padding="longest", return_tensors="pt")
        names = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        try:
            classes = [int(x) if not isinstance(x, str) or x not in names else names[x] for x in labels]
        except (TypeError, ValueError):
            raise OstateError(
                f"labels must be integers or names of the config's label2id ({', '.join(names)})", where=path
            ) from None
        if not all(0 <= i < config.num_labels for i in classes):
            raise OstateError(f"a label lies outside 0..{config.num_labels - 1} (the model's classes)", where=path)
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor(classes),
        }
    end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    ids: list[int] = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])
    count = len(ids) // block_size
    if count < 1:
        raise OstateError(
            f"holds {len(ids)} tokens, fewer than one block of {block_size}",
            where=path,
            hint="--block-size N (smaller)",
        )
    blocks = torch.tensor(ids[: count * block_size]).view(count, block_size)
    return {"input_ids": blocks, "labels": blocks}


def _read(path: str, *, classification: bool) -> tuple[list[str], list[Any]]:
    if not os.path.isfile(path):
        raise OstateError("no such file", where=path)
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.endswith(".txt"):
            if classification:
                raise OstateError("a classification checkpoint needs .jsonl data with 'text' and 'label'", where=path)
            return [f.read()], []
        if not path.endswith(".jsonl"):
            raise OstateError("unknown data file type", where=path, hint="give .txt, or .jsonl with a 'text' field")
        texts, labels = [], []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise OstateError(f"line {number} is not JSON: {e.msg}", where=path) from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise OstateError(f"line {number} has no 'text' string", where=path)
            if classification and "label" not in row:
                raise OstateError(f"line {number} has no 'label'", where=path)
            texts.append(row["text"])
            labels.append(row.get("label"))
    if not texts:
        raise OstateError("holds no text", where=path)
    return texts, labels


def _evaluate(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    device = next(model.parameters()).device
    n = min(EVAL_BLOCKS, len(data["input_ids"]))
    total, correct = 0.0, 0
    for start in range(0, n, EVAL_BATCH):
        batch = {k: v[start : min(n, start + EVAL_BATCH)].to(device) for k, v in data.items()}
        out = model(**batch)
        total += float(out.loss) * len(batch["input_ids"])
        if "attention_mask" in data:
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    result = {"loss": total / n}
    if "attention_mask" in data:
        result["accuracy"] = correct / n
    return result
