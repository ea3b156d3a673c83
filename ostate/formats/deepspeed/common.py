"""What the ZeRO reader and the universal reader of DeepSpeed checkpoints share.

Both rebuild per-parameter state and hand it to :func:`assemble`, which builds the
:class:`~ostate.state.Checkpoint` the same way; the hyperparameters, the metadata line,
the optimizer class and the frozen parameters are read the same way from either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence, cast

import torch

from ostate.errors import OstateError
from ostate.formats.deepspeed.files import (
    TagFiles,
    load_file,
)
from ostate.formats.deepspeed.zero import FlatParam, stage_3_fragments
from ostate.formats.naming import discover
from ostate.formats.naming.objects import model_entries
from ostate.formats.naming.torch_optim import read_optimizer
from ostate.state import Checkpoint, OptimizerState, ParamState, TensorRef

# The hyperparameters of the param group of frozen parameters (ParamState.frozen): none, only this
# mark, which ``ostate inspect`` shows.
FROZEN_GROUP = {"frozen": True}


# Settings in a DeepSpeed config's optimizer params that choose an implementation, not hyperparameters.
_DEEPSPEED_OPTIMIZER_SWITCHES = ("torch_adam", "adam_w_mode", "fused")


def stage_3_frozen(
    model_states: Mapping[str, Any], files: TagFiles, world: int, *, trust_pickle: bool = False
) -> dict[str, TensorRef]:
    """Frozen parameters of a stage 3 save, joined from every rank's model file (rank 0's is ``model_states``)."""
    shapes = model_states.get("frozen_param_shapes") or {}
    if not shapes:
        return {}
    if len(files.model_files) != world:
        raise OstateError(
            f"{len(files.model_files)} model state files for {world} ranks: the frozen parameters are split "
            "across every rank's model file",
            where=files.directory,
            hint="copy every rank's zero_pp_rank_*_model_states.pt of this tag",
        )
    fragments = [model_states.get("frozen_param_fragments") or {}]
    fragments += [
        load_file(f, trust_pickle=trust_pickle).get("frozen_param_fragments") or {} for f in files.model_files[1:]
    ]
    return stage_3_fragments(shapes, fragments)


@dataclass
class Hyperparameters:
    """The user's param groups' hyperparameters, with a warning when they had to be taken from the config."""

    values: list[dict[str, Any]]
    warnings: list[str]


def hyperparameters(torch_sd: Any, count: int | None, model_states: Mapping[str, Any], where: str) -> Hyperparameters:
    if isinstance(torch_sd, Mapping) and isinstance(torch_sd.get("param_groups"), list):
        values = [{k: v for k, v in g.items() if k != "params"} for g in torch_sd["param_groups"]]
        if count is not None and len(values) != count:
            raise OstateError(
                f"the optimizer has {len(values)} param groups but param_shapes lists {count}",
                where=where,
                hint="the model and optimizer files may come from different saves",
            )
        return Hyperparameters(values, [])
    # elastic_checkpoint=True saves per-group state without the groups' hyperparameters.
    config = (model_states.get("ds_config") or {}).get("optimizer") or {}
    params = {k: v for k, v in (config.get("params") or {}).items() if k not in _DEEPSPEED_OPTIMIZER_SWITCHES}
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    warning = (
        "this checkpoint (elastic_checkpoint) keeps no param-group hyperparameters; every group shows the "
        f"DeepSpeed config's optimizer params ({', '.join(sorted(params)) or 'none'}), so per-group overrides "
        "(such as weight_decay=0 for biases) are not known"
    )
    return Hyperparameters([dict(params) for _ in range(count or 0)], [warning])


def assemble(
    *,
    path: str,
    format: str,
    location: str,
    params: Sequence[FlatParam],
    groups: list[dict[str, Any]],
    group_warnings: list[str],
    frozen: Mapping[str, TensorRef | None],
    model_states: Mapping[str, Any],
    extra: dict[str, Any],
    metadata: dict[str, Any],
) -> Checkpoint:
    """Build the :class:`Checkpoint` of a ZeRO or universal checkpoint from its rebuilt parameters.

    The parameters go through the same reader as a torch state dict keyed by names,
    so detection, steps and shapes are handled in one place; frozen parameters are
    added after, without state and marked ``frozen``, in a last group ``{'frozen': True}``.
    """
    state: dict[str, dict[str, Any]] = {}
    for p in params:
        if p.state:
            state[p.name] = {**({"step": step_value(p.step)} if p.step is not None else {}), **p.state}
    param_groups = [dict(g, params=[p.name for p in params if p.group == i]) for i, g in enumerate(groups)]
    module = model_states.get("module") or {}
    shapes: dict[str, tuple[int, ...] | None] = {p.name: p.shape for p in params}
    frozen_shapes = model_states.get("frozen_param_shapes") or {}
    frozen_names = list(frozen_shapes) if frozen_shapes else inferred_frozen(module, model_states, shapes)
    for name in frozen_names:
        shape = frozen_shapes.get(name)
        shapes[name] = tuple(int(d) for d in shape) if shape is not None else shape_of(module.get(name))
    # shape_of gives None only where the module holds no torch.Tensor, so (in torch.load-ed module states) no entry.
    entries = [replace(e, shape=cast("tuple[int, ...]", shapes.get(e.name, e.shape))) for e in model_entries(module)]

    opt = read_optimizer(
        {"state": state, "param_groups": param_groups},
        location,
        model=("module", entries),
        configured_kind=configured_kind(model_states.get("ds_config"), groups),
    )
    opt.warnings[:0] = group_warnings
    opt.extra = extra
    add_frozen(opt, frozen_names, shapes)

    weights = {}
    masters = {p.name: p.fp32 for p in params if p.fp32 is not None}
    for name, t in module.items():
        if name in masters:
            weights[name] = masters.pop(name)
        elif (frozen_ref := frozen.get(name)) is not None:
            weights[name] = frozen_ref
        elif isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0:
            weights[name] = TensorRef.of(t)
    weights.update(masters)
    return Checkpoint(
        path=path,
        format=format,
        optimizers=[opt],
        weights=weights,
        weights_location="fp32 master weights (optimizer partitions); frozen parameters and buffers from 'module'",
        schedulers=[dict(s, _location=loc) for loc, s in discover.find_schedulers(model_states)],
        metadata=metadata,
    )


def add_frozen(opt: OptimizerState, names: Sequence[str], shapes: Mapping[str, tuple[int, ...] | None]) -> None:
    if not names:
        return
    opt.groups.append(dict(FROZEN_GROUP))
    group = len(opt.groups) - 1
    for name in names:
        opt.params.append(ParamState(name, name, "fqn", group, shapes.get(name), None, {}, frozen=True))


def inferred_frozen(
    module: Mapping[str, Any], model_states: Mapping[str, Any], trained: Mapping[str, Any]
) -> list[str]:
    """Module entries that are neither trained parameters, buffers nor tied copies: frozen parameters.

    Stage 1 and the BF16_Optimizer do not list frozen parameters; the module does hold them.
    """
    if not trained:
        return []
    skip = set(trained) | set(model_states.get("buffer_names") or ()) | set(model_states.get("shared_params") or ())
    return [n for n, t in module.items() if n not in skip and isinstance(t, torch.Tensor) and t.is_floating_point()]


def configured_kind(ds_config: Any, groups: Sequence[Mapping[str, Any]]) -> str | None:
    """``adamw``/``adam`` from the DeepSpeed config when the groups cannot tell (DeepSpeed's FusedAdam).

    torch's Adam groups say ``decoupled_weight_decay``; FusedAdam's do not, and its
    ``adam_w_mode`` (default on: DeepSpeed's ``Adam`` is AdamW unless told otherwise)
    lives only in the config.

    Example:
        >>> configured_kind({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, [{"betas": (0.9, 0.99)}])
        'adam'
    """
    if any("decoupled_weight_decay" in g for g in groups):
        return None
    config = (ds_config or {}).get("optimizer") if isinstance(ds_config, Mapping) else None
    if not isinstance(config, Mapping):
        return None
    kind = str(config.get("type", "")).lower()
    if kind == "adamw":
        return "adamw"
    if kind == "adam":
        return "adamw" if (config.get("params") or {}).get("adam_w_mode", True) else "adam"
    return None


def zero_stage(shard: Mapping[str, Any], model_states: Mapping[str, Any]) -> int:
    """The ZeRO stage: from the optimizer file, else (BF16_Optimizer) from the config."""
    if "zero_stage" in shard:
        return int(shard["zero_stage"])
    return int(((model_states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 1))


def deepspeed_metadata(
    model_states: Mapping[str, Any], tag_dir: str, *, stage: int, optimizer_class: str, universal: bool = False
) -> dict[str, Any]:
    """Trainer metadata: steps, world size, ZeRO stage, DeepSpeed version, precision, the tag."""
    config = model_states.get("ds_config") or {}
    metadata = discover.scalar_metadata(model_states)
    metadata.update(
        {
            "global_step": model_states.get("global_steps"),
            "zero_stage": stage,
            "optimizer_class": optimizer_class,
            "bf16": bool((config.get("bf16") or {}).get("enabled", False)),
            "fp16": bool((config.get("fp16") or {}).get("enabled", False)),
            "tag": os.path.basename(os.path.normpath(tag_dir)),
            "universal": universal,
        }
    )
    return {k: v for k, v in metadata.items() if v is not None}


def optimizer_class(shard: Mapping[str, Any], stage: int) -> str:
    """The DeepSpeed optimizer that wrote a ZeRO optimizer state (``zero_stage`` is absent from BF16_Optimizer's)."""
    if stage == 3:
        return "DeepSpeedZeroOptimizer_Stage3"
    return "DeepSpeedZeroOptimizer" if "zero_stage" in shard else "BF16_Optimizer"


def step_value(step: Any) -> Any:
    return TensorRef.of(step) if isinstance(step, torch.Tensor) else step


def shape_of(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None
