"""What Megatron's two checkpoint layouts share: its pickled ``args`` and its param groups saved without parameters."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ostate.errors import OstateError
from ostate.formats.files.torchfile import AllowedGlobal


class Namespace:
    """Stand-in for ``argparse.Namespace`` (Megatron-LM saves its ``args``): its attributes, nothing else."""


MEGATRON_GLOBALS: tuple[AllowedGlobal, ...] = ((Namespace, "argparse.Namespace"),)


def param_groups(
    saved: Mapping[str, Any],
    params: Sequence[tuple[str, tuple[int, ...]]],
    where: str,
    *,
    stacked: Callable[[str], int] = lambda name: 0,
) -> tuple[list[dict[str, Any]], dict[str, int], list[str]]:
    """The param groups' hyperparameters and each parameter's group.

    Megatron saves the groups without their parameters. Its default grouping
    (``optimizer/__init__.py::_get_param_groups`` with ``get_standard_config_overrides``)
    puts biases and 1-D parameters in a group with ``wd_mult`` 0, the rest in one with
    ``wd_mult`` 1; that rule places the parameters here. ``stacked(name)`` is the number of
    leading axes megatron's sharded keys prepend to a parameter's own shape (layers).
    """
    wrapper = saved.get("optimizer")
    inner = wrapper.get("optimizer") if isinstance(wrapper, Mapping) else None
    groups = inner.get("param_groups") if isinstance(inner, Mapping) else None
    if not isinstance(groups, list) or not groups or not all(isinstance(g, Mapping) for g in groups):
        raise OstateError(
            "the model file holds no optimizer param groups ('optimizer' -> 'optimizer' -> 'param_groups')",
            where=where,
            hint="it was saved without the optimizer (--no-save-optim?)",
        )
    groups = [dict(g) for g in groups]
    no_wd = {name: len(shape) - stacked(name) == 1 or name.endswith(".bias") for name, shape in params}
    mults = [g.get("wd_mult") for g in groups]
    if len(groups) == 1:
        return groups, {name: 0 for name, _ in params}, []
    if len(groups) == 2 and sorted(mults) == [0.0, 1.0] and not any(g.get("is_expert_parallel") for g in groups):
        zero = mults.index(0.0)
        assignment = {name: zero if no_wd[name] else 1 - zero for name, _ in params}
        note = (
            "Megatron does not save which parameters each param group holds; they are placed by its default "
            "rule (biases and 1-D parameters in the group with wd_mult 0)"
        )
        return groups, assignment, [note]
    raise OstateError(
        f"{len(groups)} param groups (wd_mult {mults}) that Megatron's default grouping does not explain",
        where=where,
        hint="Megatron does not save which parameters each group holds; ostate reads one group, or the default "
        "two (wd_mult 1 and 0)",
    )
