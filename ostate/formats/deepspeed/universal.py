"""Read a DeepSpeed universal checkpoint (``python -m deepspeed.checkpoint.ds_to_universal``).

Layout (DeepSpeed 0.19, checkpoint/ds_to_universal.py)::

    <tag>_universal/mp_rank_00_model_states.pt            a copy (stage 3: one per rank)
    <tag>_universal/zero/optimizer_state.pt               rank 0's optimizer settings and 'param_groups'
    <tag>_universal/zero/<param name>/fp32.pt             {'param': full tensor, 'cat_dim': 0}
    <tag>_universal/zero/<param name>/exp_avg.pt          (and exp_avg_sq.pt, ...) the same
    <tag>_universal/zero/<param name>/step.pt             a bare 0-d tensor (stages 1/2)

From stage 3 the per-parameter files are bare flat tensors and there is no
``step.pt`` (the step is in ``optimizer_state.pt``); frozen parameters have only
``fp32.pt`` (stages 1/2) or stay in the model files' fragments (stage 3).
The parameters' names, shapes and groups come from the model file's
``param_shapes``, as for the partitioned checkpoint.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch

from ostate.errors import OstateError
from ostate.formats.deepspeed.common import (
    assemble,
    deepspeed_metadata,
    hyperparameters,
    optimizer_class,
    stage_3_frozen,
    zero_stage,
)
from ostate.formats.deepspeed.files import UNIVERSAL_STATE, load_file, tag_files
from ostate.formats.deepspeed.zero import FlatParam, user_groups_of_subgroups
from ostate.state import Checkpoint, TensorRef

_WEIGHT_FILE = "fp32.pt"
_STEP_FILE = "step.pt"


def read_universal(tag_dir: str, *, trust_pickle: bool = False) -> Checkpoint:
    """The :class:`~ostate.state.Checkpoint` of a universal checkpoint folder (see the module docstring)."""
    files = tag_files(tag_dir)
    model_states = load_file(files.model_files[0], trust_pickle=trust_pickle)
    state_path = os.path.join(tag_dir, UNIVERSAL_STATE)
    settings = load_file(state_path, trust_pickle=trust_pickle)
    if not isinstance(settings, Mapping):
        raise OstateError("not a DeepSpeed universal optimizer_state.pt (not a dict)", where=state_path)
    param_shapes = model_states.get("param_shapes")
    if not isinstance(param_shapes, list):
        raise OstateError(
            "the model state file has no 'param_shapes' to name the parameters", where=files.model_files[0]
        )
    stage = zero_stage(settings, model_states)
    zero_dir = os.path.join(tag_dir, "zero")

    if stage == 3:
        inner = settings.get("optimizer_state_dict") or {}
        sub_group_owner = user_groups_of_subgroups(
            inner.get("param_groups") or settings.get("param_groups") or [], len(param_shapes), state_path
        )
        groups = hyperparameters(settings, None, model_states, state_path)
    else:
        sub_group_owner = list(range(len(param_shapes)))
        groups = hyperparameters(settings, len(param_shapes), model_states, state_path)

    params: list[FlatParam] = []
    for sg, shapes in enumerate(param_shapes):
        group = sub_group_owner[sg]
        group_step = ((settings.get("optimizer_state_dict") or {}).get("state") or {}).get(sg, {}).get("step")
        for name, shape in shapes.items():
            shape = tuple(int(d) for d in shape)
            tensors = _param_files(zero_dir, name, shape, trust_pickle)
            step = tensors.pop(_STEP_FILE, None)
            fp32 = tensors.pop(_WEIGHT_FILE, None)
            state = {key.removesuffix(".pt"): ref for key, ref in tensors.items()}
            params.append(FlatParam(name, group, shape, step if step is not None else group_step, state, fp32))

    frozen: Mapping[str, TensorRef | None]  # None: a frozen parameter without a weight file
    if stage == 3:
        world = int(settings.get("partition_count") or len(files.model_files))
        frozen = stage_3_frozen(model_states, files, world, trust_pickle=trust_pickle)
    else:
        frozen = {
            name: _param_files(zero_dir, name, tuple(int(d) for d in shape), trust_pickle).get(_WEIGHT_FILE)
            for name, shape in (model_states.get("frozen_param_shapes") or {}).items()
        }

    extra = {k: settings[k] for k in ("zero_stage", "partition_count", "clip_grad", "ds_version") if k in settings}
    extra["zero_stage"] = stage
    return assemble(
        path=tag_dir,
        format="deepspeed-universal",
        location=os.path.join(os.path.basename(os.path.normpath(tag_dir)), "zero"),
        params=params,
        groups=groups.values,
        group_warnings=groups.warnings,
        frozen=frozen,
        model_states=model_states,
        extra={k: (int(v) if isinstance(v, int) else v) for k, v in extra.items()},
        metadata=deepspeed_metadata(
            model_states, tag_dir, stage=stage, optimizer_class=optimizer_class(settings, stage), universal=True
        ),
    )


def _param_files(zero_dir: str, name: str, shape: tuple[int, ...], trust_pickle: bool) -> dict[str, Any]:
    """A parameter's files by file name: tensors reshaped to the parameter (step as saved: a 0-d tensor, or an int)."""
    folder = os.path.join(zero_dir, name)
    if not os.path.isdir(folder):
        return {}
    out: dict[str, Any] = {}
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".pt"):
            continue
        file = os.path.join(folder, entry)
        obj = load_file(file, trust_pickle=trust_pickle)
        tensor = obj.get("param") if isinstance(obj, Mapping) else obj
        if entry == _STEP_FILE and isinstance(tensor, (int, float)) and not isinstance(tensor, bool):
            # DeepSpeedCPUAdam (ZeRO-Offload) counts steps in a Python int, which ds_to_universal saves as is.
            out[entry] = tensor
            continue
        if not isinstance(tensor, torch.Tensor):
            raise OstateError("expected a tensor (or a dict with 'param')", where=file)
        if entry == _STEP_FILE:
            out[entry] = tensor
            continue
        if tensor.numel() != math.prod(shape):
            raise OstateError(
                f"holds {tensor.numel()} values but param_shapes gives '{name}' the shape {shape}",
                where=file,
                hint="the universal checkpoint and its model file do not match (tensor-parallel or "
                "vocabulary-padded parameters are not supported)",
            )
        out[entry] = TensorRef.of(tensor.reshape(shape))
    return out
