"""The source checkpoint of a fine-tuning ablation: weights, optimizer state, and its parameter names.

A source is read with ostate's own safe loader and naming (``ostate.load``'s path), so
any checkpoint ``ostate inspect`` understands can seed an ablation, as long as its
parameters can be named (``param_names``, FQN keys, or a model state dict beside the
optimizer): the state is carried to the fine-tuning model by name.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ostate.errors import OstateError
from ostate.formats.files.torchfile import load_torch_file
from ostate.formats.naming import discover
from ostate.formats.naming.objects import from_object
from ostate.loading import identified


@dataclass
class Source:
    """A loaded source checkpoint.

    ``optimizer_state`` is the optimizer's state dict as saved; ``names`` maps each of
    its parameter indices to a name; ``kind`` is the detected optimizer family
    (``unknown`` when ostate does not recognise it); ``fingerprint`` identifies the
    file's content (a results store keeps trials of different sources apart).
    """

    path: str
    weights: Mapping[str, torch.Tensor]
    optimizer_state: Mapping[str, Any]
    names: dict[Any, str]
    kind: str
    fingerprint: str

    def state_by_name(self) -> dict[str, Mapping[str, Any]]:
        """Each named parameter's saved state (parameters that never stepped have none)."""
        state = self.optimizer_state.get("state", {})
        return {name: state[index] for index, name in self.names.items() if index in state}

    def group_by_name(self) -> dict[str, int]:
        """The param group each named parameter was in."""
        return {
            self.names[i]: g for g, group in enumerate(self.optimizer_state["param_groups"]) for i in group["params"]
        }


def load_source(path: str | os.PathLike, *, trust_pickle: bool = False) -> Source:
    """Read a source checkpoint: one optimizer state dict and the model's weights.

    Example:
        >>> import os, tempfile, torch
        >>> m = torch.nn.Linear(2, 2); opt = torch.optim.AdamW(m.named_parameters())
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> p = os.path.join(tempfile.mkdtemp(), "src.pt")
        >>> torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, p)
        >>> s = load_source(p)
        >>> s.kind, sorted(s.names.values())
        ('adamw', ['bias', 'weight'])
    """
    path = os.fspath(path)
    obj = load_torch_file(path, trust_pickle=trust_pickle)
    found = discover.find_optimizers(obj)
    if len(found) != 1:
        raise OstateError(
            f"a source checkpoint needs exactly one optimizer state, found {len(found)}",
            where=path,
            hint=discover.top_level_summary(obj),
        )
    model = discover.find_model_state_dict(obj)
    if model is None:
        raise OstateError(
            "no model weights found beside the optimizer state",
            where=path,
            hint="save {'model': model.state_dict(), 'optimizer': optimizer.state_dict()}",
        )
    checkpoint = identified(from_object(obj, path=path))
    optimizer = checkpoint.optimizers[0]
    unnamed = [p.index for p in optimizer.params if p.name_source == "none"]
    if unnamed:
        raise OstateError(
            f"cannot name {len(unnamed)} of the optimizer's parameters, so their state cannot be carried "
            "to the fine-tuning model",
            where=path,
            hint="build the optimizer from model.named_parameters() (torch >= 2.6 saves param_names) "
            "or save the model's state dict in the same file; " + "; ".join(optimizer.warnings[:2]),
        )
    return Source(
        path=path,
        weights=dict(model[1]),
        optimizer_state=found[0][1],
        names={p.index: p.name for p in optimizer.params},
        kind=optimizer.kind,
        fingerprint=file_fingerprint(path),
    )


def file_fingerprint(path: str) -> str:
    """The SHA-256 of a file's content (first 16 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
