"""Small real checkpoints of every layout ostate reads, and a judge of what reading one did.

Shared by the hostile-input tests, the fuzz test and ``benchmarks/fuzz_readers.py``:
each specimen is written by the real library (torch.save, safetensors through
``ostate.convert``, torch.distributed.checkpoint, transformers.Trainer,
accelerate), except DeepSpeed, whose checkpoints come from tests/fixtures/deepspeed
(written by a real DeepSpeed run, see tests/helpers/deepspeed_train.py).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tests.helpers.common import REPO, Net, train

FIXTURES = REPO / "tests" / "fixtures" / "deepspeed"


@dataclass(frozen=True)
class Specimen:
    """One checkpoint: its ``path`` (file or directory) and the ``files`` in it a mutation may touch."""

    format: str
    path: Path
    files: tuple[Path, ...]


def _trained() -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    train(model, opt, steps=2)
    return model, opt


def torch_zip(directory: Path) -> Specimen:
    model, opt = _trained()
    path = directory / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, path)
    return Specimen("torch-zip", path, (path,))


def torch_legacy(directory: Path) -> Specimen:
    model, opt = _trained()
    path = directory / "legacy.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path, _use_new_zipfile_serialization=False)
    return Specimen("torch-legacy", path, (path,))


def safetensors_optimizer(directory: Path) -> Specimen:
    import ostate

    scratch = directory / "for-safetensors"
    scratch.mkdir()
    path = directory / "optimizer.safetensors"
    ostate.convert(torch_zip(scratch).path, path)
    shutil.rmtree(scratch)
    return Specimen("safetensors", path, (path,))


def dcp(directory: Path) -> Specimen:
    import torch.distributed.checkpoint as dist_checkpoint
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, opt = _trained()
    path = directory / "dcp"
    dist_checkpoint.save(
        {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
        checkpoint_id=str(path),
        no_dist=True,
    )
    return Specimen("dcp", path, _files(path))


def hf_trainer(directory: Path) -> Specimen:
    from tests.helpers.builders import tiny_gpt2, train_with_trainer

    run = train_with_trainer(directory / "trainer", tiny_gpt2(), steps=2, save_steps=2)
    return Specimen("hf-trainer", run.checkpoint, _files(run.checkpoint))


def accelerate(directory: Path) -> Specimen:
    from tests.helpers.builders import save_with_accelerate

    run = save_with_accelerate(directory / "accelerate")
    return Specimen("accelerate", run.directory, _files(run.directory))


def deepspeed(directory: Path) -> Specimen:
    path = directory / "deepspeed"
    shutil.copytree(FIXTURES / "fusedadam", path)
    (path / "ground_truth.pt").unlink()
    return Specimen("deepspeed", path, _files(path))


BUILDERS: dict[str, Callable[[Path], Specimen]] = {
    "torch-zip": torch_zip,
    "torch-legacy": torch_legacy,
    "safetensors": safetensors_optimizer,
    "dcp": dcp,
    "hf-trainer": hf_trainer,
    "accelerate": accelerate,
    "deepspeed": deepspeed,
}


def build(name: str, directory: Path) -> Specimen:
    directory.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](directory)


def _files(directory: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in directory.rglob("*") if p.is_file()))


def inspect_outcome(path: Path) -> str:
    """Read and analyse ``path`` in this process: ``ok``, or ``error`` for a one-line OstateError.

    Anything else (another exception, a multi-line message) propagates: it is a bug.
    """
    import ostate

    try:
        checkpoint = ostate.load(path)
        for optimizer in checkpoint.optimizers:
            ostate.analyze(optimizer)
    except ostate.OstateError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
        return "error"
    return "ok"


MUTATIONS = ("truncate", "flip", "splice", "zero", "overwrite", "escape")
# "escape" is not a byte mutation: it rewrites a file name that the checkpoint's own metadata supplies
# (DCP's storage records, DeepSpeed's latest, a Hugging Face shard index) to one leaving the folder.
ESCAPING = ("dcp", "deepspeed", "hf-trainer")


def mutate(data: bytes, kind: str, a: int, b: int, c: int) -> bytes:
    """One byte-level mutation of ``data``; ``a``, ``b``, ``c`` are any non-negative numbers (positions, mod size).

    Example:
        >>> mutate(b"abcdef", "truncate", 3, 0, 0), mutate(b"abcdef", "zero", 1, 3, 0)
        (b'abc', b'a\\x00\\x00def')
    """
    if not data:
        return data
    n = len(data)
    i, j = sorted((a % (n + 1), b % (n + 1)))
    if kind == "truncate":
        return data[: a % n]
    if kind == "flip":
        out = bytearray(data)
        out[a % n] ^= 1 << (b % 8)
        out[c % n] ^= 1 << (a % 8)
        return bytes(out)
    if kind == "zero":
        return data[:i] + bytes(j - i) + data[j:]
    if kind == "overwrite":  # a field set to an extreme value
        out = bytearray(data)
        out[a % n : a % n + 8] = (b"\xff" * 8 if b % 2 else b"\x7f" + b"\xff" * 7)[: n - a % n]
        return bytes(out)
    k = c % (n + 1)  # splice: a slice of the file copied elsewhere
    return data[:k] + data[i:j] + data[k:]


def mutated_copy(spec: Specimen, target: Path, file_index: int, kind: str, a: int, b: int, c: int) -> Path:
    """A copy of ``spec`` under ``target`` with one of its files mutated; returns the copy's path."""
    copy = target / spec.path.name
    if spec.path.is_dir():
        shutil.copytree(spec.path, copy, symlinks=True)
    else:
        shutil.copy(spec.path, copy)
    if kind == "escape":
        if spec.format in ESCAPING:
            escape(spec.format, copy, a, b)
        return copy
    victim = spec.files[file_index % len(spec.files)]
    relative = victim.relative_to(spec.path) if spec.path.is_dir() else None
    path = copy / relative if relative is not None else copy
    path.write_bytes(mutate(path.read_bytes(), kind, a, b, c))
    return copy


def pickle_outcome(data: bytes, archive) -> str:
    """Read a (mutated) ``data.pkl`` with ostate's own reader against a real archive's storages:
    ``ok`` for a result, ``refused`` for its one-line refusal; anything else propagates (a bug)."""
    from ostate.formats.files.torch_pickle import Unsupported, unpickle

    try:
        unpickle(data, archive.storage)
    except Unsupported as e:
        assert str(e) and "\n" not in str(e), str(e)
        return "refused"
    return "ok"


def _escaping_name(copy: Path, real: Path, a: int) -> str:
    """A name for ``real`` (a file or folder of ``copy``) that leaves ``copy``; the ``..`` and absolute
    names point at a moved, intact ``real``, so a reader that followed them would succeed."""
    outside = copy.parent / f"outside-{real.name}"
    choice = a % 5
    if choice < 2:
        shutil.move(real, outside)
        return os.path.relpath(outside, real.parent) if choice == 0 else str(outside)
    return ("C:\\\\" + real.name, real.name + "\x00", "sub/../../" + real.name)[choice - 2]


def escape(layout: str, copy: Path, a: int, b: int) -> None:
    """Rewrite one file name supplied by ``copy``'s metadata to one leaving the folder."""
    if layout == "dcp":
        metadata = pickle.loads((copy / ".metadata").read_bytes())  # our own file: a plain pickle is fine
        records = sorted(metadata.storage_data.items(), key=lambda item: str(item[0]))
        chosen = records[b % len(records)][1].relative_path
        name = _escaping_name(copy, copy / chosen, a)
        for _, info in records:
            if info.relative_path == chosen:
                info.relative_path = name
        (copy / ".metadata").write_bytes(pickle.dumps(metadata))
    elif layout == "deepspeed":
        tag = (copy / "latest").read_text().strip()
        (copy / "latest").write_text(_escaping_name(copy, copy / tag, a))
    elif layout == "hf-trainer":  # its weights as a one-shard index, the shard named outside
        from safetensors import safe_open

        shard = copy / "model-00001-of-00001.safetensors"
        (copy / "model.safetensors").rename(shard)
        with safe_open(shard, "pt") as f:
            keys = list(f.keys())
        name = _escaping_name(copy, shard, a)
        index = {"metadata": {}, "weight_map": {k: name for k in keys}}
        (copy / "model.safetensors.index.json").write_text(json.dumps(index))
