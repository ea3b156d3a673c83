"""The source checkpoint of a fine-tuning ablation: weights, optimizer state, and its parameter names.

A source is read by :func:`ostate.load`, so every layout it reads can seed an
ablation: a ``torch.save`` file or Lightning ``.ckpt``, a Hugging Face Trainer
``checkpoint-N/``, an accelerate ``save_state`` folder (the optimizer chosen by index
when it holds several), a torch.distributed.checkpoint folder (FSDP2 shards
reassembled), DeepSpeed ZeRO 1-3 and universal checkpoints, and what ``ostate reset``
writes in any of them. The parameters are named by ostate's naming (with how each name
was found, :attr:`Source.provenance`), and the state moves to the fine-tuning model by
name (:mod:`ostate.harness.transfer`).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ostate.errors import OstateError
from ostate.formats.naming.weights import find_weights
from ostate.loading import load, pick_optimizer
from ostate.optimizers import families
from ostate.state import Checkpoint, OptimizerState, TensorRef


@dataclass
class Source:
    """A loaded source checkpoint.

    ``optimizer_state`` is the optimizer's state dict (as torch's ``state_dict()`` has
    it: ``state`` by index, ``param_groups`` listing indices); ``names`` maps each of its
    parameter indices to a name; ``kind`` is the detected optimizer family (``unknown``
    when ostate does not recognise it); ``fingerprint`` identifies the checkpoint's
    content (a results store keeps trials of different sources apart); ``provenance``
    says how each name was found (``param_names``, ``fqn``, ``model-order``,
    ``hf-decay-rule``, ``shape-match``: see docs/formats.md); ``format`` the layout read.
    """

    path: str
    weights: Mapping[str, torch.Tensor]
    optimizer_state: Mapping[str, Any]
    names: dict[Any, str]
    kind: str
    fingerprint: str
    provenance: dict[str, str] = field(default_factory=dict)
    format: str = "torch"
    config: dict[str, Any] | None = None

    def state_by_name(self) -> dict[str, Mapping[str, Any]]:
        """Each named parameter's saved state (parameters that never stepped have none)."""
        state = self.optimizer_state.get("state", {})
        return {name: state[index] for index, name in self.names.items() if index in state}

    def group_by_name(self) -> dict[str, int]:
        """The param group each named parameter was in."""
        return {
            self.names[i]: g for g, group in enumerate(self.optimizer_state["param_groups"]) for i in group["params"]
        }

    def naming_summary(self) -> str:
        """How the names were found, e.g. ``'12 by fqn'`` or ``'26 by hf-decay-rule, 2 by shape-match'``."""
        counts = Counter(self.provenance.values())
        return ", ".join(f"{n} by {how}" for how, n in counts.most_common())


def load_source(path: str | os.PathLike, *, optimizer_index: int | None = None, trust_pickle: bool = False) -> Source:
    """Read a source checkpoint: one optimizer's state and the model's weights, by name.

    ``optimizer_index`` chooses the optimizer of a checkpoint holding several (an
    accelerate folder with two, a GAN's Lightning ``.ckpt``); an error lists them otherwise.

    Example:
        >>> import os, tempfile, torch
        >>> m = torch.nn.Linear(2, 2); opt = torch.optim.AdamW(m.named_parameters())
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> p = os.path.join(tempfile.mkdtemp(), "src.pt")
        >>> torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, p)
        >>> s = load_source(p)
        >>> s.kind, sorted(s.names.values()), s.naming_summary()
        ('adamw', ['bias', 'weight'], '2 by param_names')
    """
    path = os.fspath(path)
    checkpoint = load(path, trust_pickle=trust_pickle)
    if optimizer_index is None and len(checkpoint.optimizers) > 1:
        listing = ", ".join(
            f"{i}: {o.location} ({o.kind}, {len(o.params)} params)" for i, o in enumerate(checkpoint.optimizers)
        )
        raise OstateError(
            f"holds {len(checkpoint.optimizers)} optimizers; an ablation fine-tunes with one",
            where=path,
            hint=f"choose it with --optimizer-index K (Python: optimizer_index=K; TOML: source_optimizer = K): {listing}",
        )
    optimizer = pick_optimizer(checkpoint, optimizer_index)
    trained = [p for p in optimizer.params if not p.frozen]
    unnamed = [p for p in trained if p.name_source == "none"]
    if unnamed:
        raise OstateError(
            f"cannot name {len(unnamed)} of the optimizer's {len(trained)} parameters "
            f"({', '.join(p.name for p in unnamed[:3])}), so their state cannot be carried to the fine-tuning model",
            where=path,
            hint="build the optimizer from model.named_parameters() (torch >= 2.6 saves param_names) "
            "or save the model's state dict in the same checkpoint; " + "; ".join(optimizer.warnings[:2]),
        )
    weights = _weights(checkpoint, optimizer_index)
    if not weights:
        raise OstateError(
            "no model weights found beside the optimizer state",
            where=path,
            hint="save {'model': model.state_dict(), 'optimizer': optimizer.state_dict()} "
            "(a checkpoint folder: the model's weights file beside the optimizer's)",
        )
    _check_shapes(optimizer, weights, path)
    return Source(
        path=path,
        weights=weights,
        optimizer_state=_state_dict(optimizer),
        names={p.index: p.name for p in trained},
        kind=optimizer.kind,
        fingerprint=fingerprint(path),
        provenance={p.name: p.name_source for p in trained},
        format=checkpoint.format,
        config=checkpoint.config,
    )


def _weights(checkpoint: Checkpoint, optimizer_index: int | None) -> dict[str, torch.Tensor]:
    """The weights of the chosen optimizer's model, read into memory (accelerate keeps model ``k`` beside optimizer ``k``)."""
    refs: Mapping[str, TensorRef] | None = checkpoint.weights
    if checkpoint.format == "accelerate" and optimizer_index and os.path.isdir(checkpoint.path):
        found = find_weights(checkpoint.path, index=optimizer_index)
        refs = found.tensors if found is not None and found.tensors else refs
    return {name: ref.read().detach().clone() for name, ref in (refs or {}).items()}


def _check_shapes(optimizer: OptimizerState, weights: Mapping[str, torch.Tensor], path: str) -> None:
    """Each parameter's state tensors have its weight's shape (a mismatch: the names or the file are wrong)."""
    wrong = []
    for p in optimizer.params:
        weight = weights.get(p.name)
        if weight is None or p.frozen:
            continue
        for key, ref in p.tensors().items():
            if ref.numel > 1 and ref.numel != weight.numel():  # scalars (step) aside
                wrong.append(f"{p.name}: {key} {tuple(ref.shape)} vs weight {tuple(weight.shape)}")
    if wrong:
        raise OstateError(
            f"the optimizer state does not fit the model weights for {len(wrong)} parameter(s): {'; '.join(wrong[:3])}",
            where=path,
            hint="the parameters were named wrongly or the checkpoint mixes two models; "
            "save the optimizer with param_names (torch >= 2.6, named_parameters())",
        )


def _state_dict(optimizer: OptimizerState) -> dict[str, Any]:
    """The optimizer's state dict as torch keeps it, every tensor read (a frozen-only group left out).
    A tensor with the parameter's size gets its shape (flat buffers of sharded formats), except
    the state the optimizer keeps flat itself (Prodigy's ``s`` and ``p0``)."""
    state: dict[Any, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    family = families().get(optimizer.kind)
    flat = family.layout.flat if family is not None and family.layout is not None else ()
    for g, hyper in enumerate(optimizer.groups):
        if optimizer.is_frozen_group(g):
            continue
        members = [p for p in optimizer.params if p.group == g and not p.frozen]
        groups.append({**hyper, "params": [p.index for p in members]})
        for p in members:
            if p.state:
                state[p.index] = {
                    k: _tensor(v.read(), None if k in flat else p.shape) if isinstance(v, TensorRef) else v
                    for k, v in p.state.items()
                }
    return {"state": state, "param_groups": groups}


def _tensor(value: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    out = value.detach().clone()
    if shape is not None and out.numel() == _numel(shape) and out.dim() > 0 and tuple(out.shape) != tuple(shape):
        out = out.reshape(shape)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fingerprint(path: str) -> str:
    """The SHA-256 of a checkpoint's content: a file's bytes, or a folder's files (names and bytes), 16 hex digits."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                digest.update(os.path.relpath(full, path).encode() + b"\0")
                _update(digest, full)
    else:
        _update(digest, path)
    return digest.hexdigest()[:16]


def _update(digest: Any, path: str) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
