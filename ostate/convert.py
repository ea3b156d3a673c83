"""Write one optimizer's state from any readable checkpoint as safetensors or as a plain torch state dict.

``.safetensors`` output is the layout of :mod:`ostate.formats.safetensors_optim`,
written one tensor at a time. ``.pt`` output is a ``torch.optim`` state dict
(``{'state': {index: {...}}, 'param_groups': [{..., 'params': [index, ...]}]}``,
indices numbered across the groups in order) that
``torch.optim.Optimizer.load_state_dict`` accepts for an optimizer built with the
same parameters in the same groups; ``torch.save`` needs every tensor at hand, so
this form holds the state in memory while it is written (memory-mapped where the
source allows). Outputs are written atomically and never over the input.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from tqdm.auto import tqdm

from ostate.errors import OstateError
from ostate.formats import safetensors_optim
from ostate.loading import load, pick_optimizer
from ostate.outputs import atomic_file, check_output
from ostate.state import OptimizerState, TensorRef

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    optimizer_index: int | None = None,
    trust_pickle: bool = False,
    format_hint: str | None = None,
    optimizer: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> OptimizerState:
    """Read the checkpoint at ``source`` and write one of its optimizers to ``out``.

    ``out`` ending in ``.safetensors`` gets ostate's safetensors layout; ``.pt``,
    ``.pth`` or ``.bin`` a plain ``torch.optim`` state dict. ``optimizer_index``
    picks the optimizer when the checkpoint holds several. Returns the optimizer written.

    Example:
        >>> import ostate, torch, tempfile, os
        >>> m = torch.nn.Linear(3, 2); opt = torch.optim.AdamW(m.parameters())
        >>> m(torch.ones(1, 3)).sum().backward(); opt.step()
        >>> d = tempfile.mkdtemp(); src = os.path.join(d, "ckpt.pt")
        >>> torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, src)
        >>> written = convert(src, os.path.join(d, "optimizer.safetensors"))
        >>> [p.name for p in ostate.load(os.path.join(d, "optimizer.safetensors")).optimizers[0].params]
        ['weight', 'bias']
    """
    source, out = os.fspath(source), os.fspath(out)
    writer = _writer_for(out)
    check_output(out, [source], overwrite=overwrite)
    checkpoint = load(source, trust_pickle=trust_pickle, optimizer=optimizer, format_hint=format_hint)
    chosen = pick_optimizer(checkpoint, optimizer_index)
    writer(chosen, out, source=f"{source} ({checkpoint.format}), {chosen.location}", progress=progress)
    return chosen


def to_torch_state_dict(optimizer: OptimizerState) -> dict[str, Any]:
    """A plain ``torch.optim`` state dict of the optimizer, its tensors read.

    Parameters are numbered 0, 1, ... across the groups in order, as
    ``Optimizer.state_dict`` numbers them; ``param_names`` is kept only when the
    source had it (names that ostate inferred are not written as if torch had saved them).

    Example:
        >>> import ostate, torch
        >>> m = torch.nn.Linear(3, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        >>> m(torch.ones(1, 3)).sum().backward(); opt.step()
        >>> sd = to_torch_state_dict(ostate.from_state_dict(opt.state_dict()).optimizers[0])
        >>> fresh = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9); fresh.load_state_dict(sd)
        >>> [g["params"] for g in sd["param_groups"]], sorted(sd["state"][0])
        ([[0, 1]], ['momentum_buffer'])
    """
    named = bool(optimizer.params) and all(p.name_source == "param_names" for p in optimizer.params)
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for g, hyperparameters in enumerate(optimizer.groups):
        members = [p for p in optimizer.params if p.group == g]
        ids = list(range(index, index + len(members)))
        index += len(members)
        group = {**hyperparameters, "params": ids}
        if named:
            group["param_names"] = [p.name for p in members]
        groups.append(group)
        for pid, p in zip(ids, members):
            if p.has_state:
                state[pid] = {k: v.read() if isinstance(v, TensorRef) else v for k, v in p.state.items()}
    return {"state": state, "param_groups": groups}


def write_torch(optimizer: OptimizerState, path: str, *, source: str = "", progress: bool = False) -> None:
    """Write the optimizer as a plain ``torch.optim`` state dict, atomically (``source``, ``progress`` unused)."""
    state_dict = to_torch_state_dict(optimizer)
    with atomic_file(path) as f:
        torch.save(state_dict, f)


def write_safetensors(optimizer: OptimizerState, path: str, *, source: str = "", progress: bool = False) -> None:
    """Write the optimizer in ostate's safetensors layout, one tensor at a time, with a progress bar on request."""
    total = sum(p.state_bytes for p in optimizer.params)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=os.path.basename(path),
        disable=not progress,
        delay=1.0,
        leave=False,
    ) as bar:
        safetensors_optim.write(optimizer, path, source=source, progress=bar)


def _writer_for(out: str):
    lower = out.lower()
    if lower.endswith(SAFETENSORS_SUFFIX):
        return write_safetensors
    if lower.endswith(TORCH_SUFFIXES):
        return write_torch
    raise OstateError(
        "unknown output type",
        where=out,
        hint=f"name it *{SAFETENSORS_SUFFIX} (safetensors) or *.pt (a torch optimizer state dict)",
    )
