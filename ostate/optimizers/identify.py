"""Decide which optimizer family a record that a reader built belongs to.

Readers (``ostate.formats``) know nothing of optimizer families: they record each
optimizer's state and group keys, and :func:`ostate.load` calls :func:`identify` on every
optimizer it returns.
"""

from __future__ import annotations

from ostate.optimizers.registry import detect, families, get_family
from ostate.state import OptimizerState


def identify(optimizer: OptimizerState, kind: str | None = None) -> None:
    """Set ``optimizer.kind`` and ``kind_source`` from its keys, or to ``kind`` when given.

    A reader may have named the family from the checkpoint's own configuration (a
    DeepSpeed config: ``kind_source == "ds_config"``); that is kept like a family the
    user named, with a warning when the keys do not fit it. Warnings about the family
    come first in ``optimizer.warnings``.

    Example:
        >>> import torch
        >>> from ostate.formats.naming.torch_optim import read_optimizer
        >>> p = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        >>> p.grad = torch.ones(2); opt.step()
        >>> o = read_optimizer(opt.state_dict(), "optimizer")
        >>> o.kind_source
        'unidentified'
        >>> identify(o); o.kind, o.kind_source
        ('sgd', 'detected')
    """
    configured = optimizer.kind if optimizer.kind_source == "ds_config" else None
    named, named_by = (kind, "user") if kind is not None else (configured, "ds_config")
    state_keys = optimizer.state_keys
    # A group a reader added for frozen parameters (DeepSpeed's) is not the optimizer's: it says nothing of the family.
    groups = [g for i, g in enumerate(optimizer.groups) if not optimizer.is_frozen_group(i)]
    warnings: list[str] = []
    if named is not None:
        family = get_family(named)
        kind_source = named_by
        fits = all(family.match(state_keys, g) > 0 for g in groups) if groups else True
        if family.name != "unknown" and not fits:
            detected, _source, _also = detect(state_keys, groups)
            warnings.append(
                f"the state and group keys do not look like '{named}' (they fit '{detected}'); "
                f"reading them as '{named}' as asked"
            )
    else:
        name, kind_source, also = detect(state_keys, groups)
        family = get_family(name)
        if kind_source == "assumed":
            warnings.append(
                f"the state and group keys fit {', '.join([name, *also])} equally; read as '{name}' "
                f"(pass --optimizer {also[0]} if that is what was used)"
            )
        elif kind_source == "unknown" and state_keys:
            known = ", ".join(sorted(families()))
            warnings.append(
                f"unrecognised optimizer state (state keys: {', '.join(sorted(map(str, state_keys)))}); showing plain "
                f"statistics of each state tensor (pass --optimizer KIND, one of: {known})"
            )
    optimizer.kind, optimizer.kind_source = family.name, kind_source
    optimizer.warnings[:0] = warnings
