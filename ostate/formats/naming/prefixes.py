"""Drop the prefixes that wrappers put in front of every parameter name.

``torch.compile(model)`` returns an ``OptimizedModule`` that holds the model as
``_orig_mod``; ``DistributedDataParallel`` and ``DataParallel`` hold it as ``module``. A
checkpoint saved from the wrapper names every parameter (its ``param_names``, the model
state dict's keys) ``_orig_mod.fc.weight`` or ``module.fc.weight``: the module's own name
behind the wrapper's. When every name of an optimizer carries one of these prefixes
(wrappers nest: ``module._orig_mod.``), it is dropped from the names and from the
model's weights and order, and :attr:`~ostate.state.OptimizerState.name_notes` says so.

DeepSpeed checkpoints keep their names as saved: its writer finds each parameter's
files by that name.
"""

from __future__ import annotations

from typing import Mapping

from ostate.state import Checkpoint, TensorRef

# Each prefix and the wrapper that adds it.
WRAPPER_PREFIXES = {"_orig_mod.": "torch.compile", "module.": "DistributedDataParallel"}
# Formats whose writer looks parameters up by their saved names.
KEEP_SAVED_NAMES = ("deepspeed", "deepspeed-universal")


def drop_wrapper_prefixes(checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` with wrapper prefixes dropped from every optimizer whose names all carry one.

    Example:
        >>> from ostate.state import OptimizerState, ParamState
        >>> p = ParamState(0, "_orig_mod.fc.weight", "param_names", 0, (2, 2), 1.0)
        >>> ckpt = drop_wrapper_prefixes(Checkpoint("x.pt", "torch", [OptimizerState("optimizer", "adamw", "detected", [{}], [p])]))
        >>> p.name, ckpt.optimizers[0].name_notes
        ('fc.weight', ["torch.compile's '_orig_mod.' prefix dropped from 1 name"])
    """
    if checkpoint.format in KEEP_SAVED_NAMES:
        return checkpoint
    dropped_from_weights: list[str] = []
    for optimizer in checkpoint.optimizers:
        prefixes = _common_prefixes([p.name for p in optimizer.params if p.name_source != "none"])
        if not prefixes:
            continue
        whole = "".join(prefixes)
        for p in optimizer.params:
            if p.name_source != "none":
                p.name = p.name[len(whole) :]
        optimizer.model_order = [n[len(whole) :] if n.startswith(whole) else n for n in optimizer.model_order]
        optimizer.param_kinds = {
            k[len(whole) :] if k.startswith(whole) else k: v for k, v in optimizer.param_kinds.items()
        }
        named = sum(p.name_source != "none" for p in optimizer.params)
        for prefix in prefixes:
            optimizer.name_notes.append(
                f"{WRAPPER_PREFIXES[prefix]}'s '{prefix}' prefix dropped from {named} name{'s' if named != 1 else ''}"
            )
        dropped_from_weights.append(whole)
    if checkpoint.weights and dropped_from_weights:
        checkpoint.weights = _without_prefix(checkpoint.weights, dropped_from_weights[0])
    return checkpoint


def _common_prefixes(names: list[str]) -> list[str]:
    """The wrapper prefixes every name starts with, outermost first (none when a name would be left empty)."""
    found: list[str] = []
    rest = names
    while rest:
        prefix = next((p for p in WRAPPER_PREFIXES if all(n.startswith(p) and len(n) > len(p) for n in rest)), None)
        if prefix is None:
            break
        found.append(prefix)
        rest = [n[len(prefix) :] for n in rest]
    return found


def _without_prefix(weights: Mapping[str, TensorRef], prefix: str) -> dict[str, TensorRef]:
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in weights.items()}
