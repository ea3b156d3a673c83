"""Write a ``torch.save`` file again with some of its optimizer state dicts replaced, everything else kept.

The file is opened as :mod:`ostate.formats.files.torchfile` opens it (safely, memory-mapped);
each optimizer state dict in it is found by its structure
(:func:`~ostate.formats.naming.discover.find_optimizer_routes`) and offered to a transform;
only the containers along a replaced entry's route are copied, so every other entry
(the model, schedulers, epoch, Lightning's loops and callbacks, ...) is written back as
the very object that was read. The new file is written atomically.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import torch

from ostate.formats.files.torchfile import AllowedGlobal, load_torch_file
from ostate.formats.naming.discover import find_optimizer_routes, replaced
from ostate.outputs import atomic_file

# location inside the file -> the new optimizer state dict, or None to keep it as it is.
Transform = Callable[[str, Mapping[str, Any]], "Mapping[str, Any] | None"]


def rewrite_torch_file(
    source: str | os.PathLike,
    target: str | os.PathLike,
    transform: Transform,
    *,
    trust_pickle: bool = False,
    allowed_globals: Sequence[AllowedGlobal] = (),
    pickle_module: Any = None,
    finish: Callable[[Any], Any] | None = None,
) -> list[str]:
    """Write ``source`` to ``target`` with each optimizer state dict passed through ``transform``.

    Returns the locations that were replaced. ``allowed_globals`` and ``pickle_module``
    let a format reader load its own stand-in classes and write them back under their
    original names (DeepSpeed's files). ``finish`` makes a last change to the whole object
    before it is written (``ostate reset`` drops scheduler states with it).

    Example:
        >>> import tempfile, os
        >>> m = torch.nn.Linear(2, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> d = tempfile.mkdtemp(); src, dst = os.path.join(d, "a.pt"), os.path.join(d, "b.pt")
        >>> torch.save({"model": m.state_dict(), "optim": opt.state_dict(), "epoch": 3}, src)
        >>> rewrite_torch_file(src, dst, lambda location, sd: {**sd, "state": {}})
        ['optim']
        >>> out = torch.load(dst, weights_only=True); out["optim"]["state"], out["epoch"]
        ({}, 3)
    """
    obj = load_torch_file(os.fspath(source), trust_pickle=trust_pickle, allowed_globals=allowed_globals)
    new = obj
    changed = []
    for location, route, state_dict in find_optimizer_routes(obj):
        result = transform(location, state_dict)
        if result is not None:
            new = replaced(new, route, result)
            changed.append(location)
    if finish is not None:
        new = finish(new)
    with atomic_file(target) as f:
        if pickle_module is None:
            torch.save(new, f)
        else:
            torch.save(new, f, pickle_module=pickle_module)
    return changed
