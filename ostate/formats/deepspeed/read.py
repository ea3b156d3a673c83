"""Read a DeepSpeed checkpoint folder: ZeRO stages 0-3, the BF16_Optimizer, universal checkpoints.

Give the folder ``engine.save_checkpoint`` wrote to (its ``latest`` file names the tag
to read; ``tag=`` picks another) or a tag folder itself (``global_step300/``,
``global_step300_universal/``). Every parameter comes out with its real name (from
the model file's ``param_shapes``), its param group and that group's
hyperparameters, its step, and its optimizer state joined from the ranks'
partitions with the padding removed (see :mod:`ostate.formats.deepspeed.zero`).
The fp32 master weights, which under ZeRO are the real weights, become
``Checkpoint.weights``. DeepSpeed itself is not needed.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from ostate.errors import OstateError
from ostate.formats import accelerate, hf_trainer
from ostate.formats.deepspeed.common import (
    add_frozen,
    assemble,
    deepspeed_metadata,
    hyperparameters,
    inferred_frozen,
    optimizer_class,
    shape_of,
    stage_3_frozen,
    zero_stage,
)
from ostate.formats.deepspeed.files import (
    DynamicLossScaler,
    LossScaler,
    TagFiles,
    is_tag_dir,
    is_universal,
    load_file,
    looks_like_run_dir,
    resolve_tag_dir,
    tag_files,
)
from ostate.formats.deepspeed.universal import read_universal
from ostate.formats.deepspeed.zero import stage_1_2_params, stage_3_params
from ostate.formats.naming import discover
from ostate.formats.naming.objects import from_object
from ostate.formats.reader import Reader
from ostate.state import Checkpoint, TensorRef

# Keys of a ZeRO optimizer_state_dict that are plain settings worth keeping in OptimizerState.extra.
_EXTRA_KEYS = (
    "zero_stage",
    "partition_count",
    "dynamic_loss_scale",
    "overflow",
    "clip_grad",
    "cur_scale",
    "cur_iter",
    "ds_version",
)


def is_deepspeed_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a DeepSpeed checkpoint folder (a ``save_dir`` or one tag inside it).

    Example:
        >>> import tempfile
        >>> is_deepspeed_folder(tempfile.mkdtemp())
        False
    """
    path = os.fspath(path)
    return os.path.isdir(path) and (is_tag_dir(path) or looks_like_run_dir(path))


def read(path: str | os.PathLike, *, trust_pickle: bool = False, tag: str | None = None) -> Checkpoint:
    """Read a DeepSpeed checkpoint folder into a :class:`~ostate.state.Checkpoint`.

    Args:
        path: the ``save_dir`` (with ``latest``) or a tag folder (``global_step300``).
        trust_pickle: allow pickled objects beyond tensors, plain containers and the
            four small DeepSpeed classes ZeRO files hold (needs DeepSpeed installed).
        tag: inside a ``save_dir``, the tag folder to read instead of the one ``latest`` names.

    Example:
        >>> import ostate, tempfile  # a real checkpoint: see examples/deepspeed_zero.py
        >>> read(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        ostate.errors.OstateError: ...: no 'latest' file to say which DeepSpeed tag to read (pass one of the tag folders: none)
    """
    path = os.fspath(path)
    tag_dir = resolve_tag_dir(path, tag)
    try:
        return _read_tag(tag_dir, trust_pickle=trust_pickle)
    except (KeyError, AttributeError, TypeError, IndexError, ValueError) as e:
        # The files unpickled (safely) but do not hold what DeepSpeed writes: a damaged or
        # hand-made file. The checks above name the common cases; this catches the rest.
        raise OstateError(
            f"the files do not have the layout DeepSpeed writes ({type(e).__name__}: {e})",
            where=tag_dir,
            hint="a file may be damaged, or from a DeepSpeed version ostate does not "
            "know; rerun with --debug for where it failed",
        ) from e


def _read_tag(tag_dir: str, *, trust_pickle: bool) -> Checkpoint:
    if is_universal(tag_dir):
        return read_universal(tag_dir, trust_pickle=trust_pickle)
    files = tag_files(tag_dir)
    model_states = load_file(files.model_files[0], trust_pickle=trust_pickle)
    _check_model_states(model_states, files.model_files[0])
    if not files.optim_files:
        return _read_stage_0(tag_dir, files, model_states)
    world = _world_size(model_states, files)
    shards = [_optimizer_state_dict(load_file(f, trust_pickle=trust_pickle), f) for f in files.optim_files]
    _check_partition_counts(shards, files, world)
    stage = zero_stage(shards[0], model_states)
    where = _pattern(files.optim_files)
    frozen: dict[str, TensorRef] = {}
    if stage == 3:
        params = stage_3_params(_param_shapes(model_states, files.model_files[0]), shards, where)
        frozen = stage_3_frozen(model_states, files, world, trust_pickle=trust_pickle)
        groups = hyperparameters(shards[0]["optimizer_state_dict"], None, model_states, where)
    else:
        params = stage_1_2_params(_param_shapes(model_states, files.model_files[0]), shards, where)
        frozen = {name: TensorRef.of(t) for name, t in (model_states.get("frozen_param_fragments") or {}).items()}
        groups = hyperparameters(
            shards[0].get("base_optimizer_state"), len(model_states["param_shapes"]), model_states, where
        )
    extra = {k: _plain(shards[0][k]) for k in _EXTRA_KEYS if k in shards[0]}
    extra.update(_loss_scale(shards[0]))
    metadata = deepspeed_metadata(model_states, tag_dir, stage=stage, optimizer_class=optimizer_class(shards[0], stage))
    return assemble(
        path=tag_dir,
        format="deepspeed",
        location=where,
        params=params,
        groups=groups.values,
        group_warnings=groups.warnings,
        frozen=frozen,
        model_states=model_states,
        extra=extra,
        metadata=metadata,
    )


def _read_stage_0(tag_dir: str, files: TagFiles, model_states: Mapping[str, Any]) -> Checkpoint:
    """ZeRO disabled: the whole optimizer is a torch state dict inside the model file, named by model order."""
    module = model_states.get("module") or {}
    ckpt = from_object(model_states, path=files.model_files[0], model=("module", module), format="deepspeed")
    ckpt.path = tag_dir
    wrapper = model_states.get("optimizer")
    wrapper_class = "torch"
    if isinstance(wrapper, Mapping) and "fp32_groups" in wrapper:
        # FP16_UnfusedOptimizer (bf16/fp16 without ZeRO): fp32 masters in the optimizer's group order.
        wrapper_class = "FP16_UnfusedOptimizer"
        masters = [t for group in wrapper["fp32_groups"] for t in group]
        params = ckpt.optimizers[0].params
        if len(masters) == len(params) and all(p.name_source != "none" for p in params):
            ckpt.weights = {**(ckpt.weights or {}), **{p.name: TensorRef.of(t) for p, t in zip(params, masters)}}
            ckpt.weights_location = "fp32 master weights (optimizer.fp32_groups); buffers from 'module'"
    opt = ckpt.optimizers[0]
    if all(p.name_source != "none" for p in opt.params):
        named = {p.name: p.shape for p in opt.params}
        frozen = inferred_frozen(module, model_states, named)
        add_frozen(opt, frozen, {n: shape_of(module.get(n)) for n in frozen})
    ckpt.metadata = deepspeed_metadata(model_states, tag_dir, stage=0, optimizer_class=wrapper_class)
    return ckpt


def _check_model_states(model_states: Any, where: str) -> None:
    if not isinstance(model_states, Mapping) or "module" not in model_states:
        raise OstateError(
            "not a DeepSpeed model state file (no 'module' entry)",
            where=where,
            hint=discover.top_level_summary(model_states),
        )


def _optimizer_state_dict(obj: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping) or not isinstance(obj.get("optimizer_state_dict"), Mapping):
        raise OstateError(
            "not a DeepSpeed optimizer state file (no 'optimizer_state_dict' entry)",
            where=where,
            hint=discover.top_level_summary(obj),
        )
    return obj["optimizer_state_dict"]


def _param_shapes(model_states: Mapping[str, Any], where: str) -> list[Mapping[str, Sequence[int]]]:
    shapes = model_states.get("param_shapes")
    if not isinstance(shapes, list):
        raise OstateError(
            "the model state file has no 'param_shapes' to name the ZeRO partitions",
            where=where,
            hint="it may come from a DeepSpeed version older than 0.3 or from another save",
        )
    return shapes


def _world_size(model_states: Mapping[str, Any], files: TagFiles) -> int:
    world = len(files.optim_files)
    saved = model_states.get("dp_world_size")
    if isinstance(saved, int) and saved != world:
        raise OstateError(
            f"the checkpoint was saved by {saved} data-parallel ranks but {world} optimizer files are here",
            where=files.directory,
            hint="copy every rank's optimizer file of this tag (or remove files left from another run)",
        )
    if len(files.model_files) > 1 and len(files.model_files) != world:
        raise OstateError(
            f"{len(files.model_files)} model state files but {world} optimizer files",
            where=files.directory,
            hint="stage 3 saves one of each per rank; copy every rank's files of this tag",
        )
    return world


def _check_partition_counts(shards: Sequence[Mapping[str, Any]], files: TagFiles, world: int) -> None:
    for shard, f in zip(shards, files.optim_files):
        counts = shard.get("partition_count")
        counts = counts if isinstance(counts, list) else [counts] if counts is not None else []
        wrong = [int(c) for c in counts if int(c) != world]
        if wrong:
            raise OstateError(
                f"this rank's file was written with {wrong[0]} ranks, but {world} rank files are here",
                where=f,
                hint="files of runs with different world sizes are mixed in this folder",
            )


def _loss_scale(shard: Mapping[str, Any]) -> dict[str, Any]:
    scaler = shard.get("loss_scaler")
    if isinstance(scaler, (LossScaler, DynamicLossScaler)):
        return {"loss_scale": _plain(getattr(scaler, "cur_scale", None)), "loss_scaler": type(scaler).__name__}
    return {}


def _plain(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, (float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _pattern(files: Sequence[str]) -> str:
    """``global_step3/zero_pp_rank_*_mp_rank_00_optim_states.pt`` for a list of rank files."""
    name = os.path.basename(files[0])
    if len(files) > 1:
        name = re.sub(r"zero_pp_rank_\d+_", "zero_pp_rank_*_", name)
    return os.path.join(os.path.basename(os.path.dirname(files[0])), name)


def sniff(path: str) -> int:
    """3 for a DeepSpeed tag folder, 2 for a save folder (a ``latest`` file or tag folders inside), else 0."""
    if not os.path.isdir(path):
        return 0
    if is_tag_dir(path):
        return 3
    return 2 if looks_like_run_dir(path) else 0


def read_folder(path: str, *, trust_pickle: bool = False) -> Checkpoint:
    """:func:`read`, plus what a Hugging Face Trainer saved beside DeepSpeed's folders.

    A Trainer run under DeepSpeed writes ``checkpoint-N/`` with ``trainer_state.json``
    and ``scheduler.pt`` next to ``latest`` and ``global_step<N>/``: their global step,
    epoch, logged lr and schedule join the header.
    """
    checkpoint = read(path, trust_pickle=trust_pickle)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, hf_trainer.TRAINER_STATE)):
        meta, warnings = hf_trainer.trainer_metadata(path)
        checkpoint.metadata.update(meta)
        schedulers, scheduler_warnings = accelerate.read_schedulers(path, trust_pickle=trust_pickle)
        checkpoint.schedulers.extend(schedulers)
        checkpoint.warnings.extend(warnings + scheduler_warnings)
    return checkpoint


READER = Reader(
    name="deepspeed",
    summary="a DeepSpeed save folder (latest + global_step<N>/) or one tag folder: ZeRO 0-3, BF16_Optimizer, universal",
    sniff=sniff,
    read=read_folder,
)
