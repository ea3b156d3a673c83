"""Read one ``torch.optim`` state dict into an :class:`~ostate.state.OptimizerState`.

``{'state': {index: {key: value}}, 'param_groups': [{..., 'params': [index, ...]}]}``:
indices run across the groups in order; a parameter that never stepped (or is
frozen) is listed in its group but has no entry in ``state``. State may instead be
keyed by fully qualified names (``get_optimizer_state_dict``), in which case the
names are the keys.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, Sequence, cast

import torch

from ostate.errors import OstateError
from ostate.formats.files.galore_state import is_projector
from ostate.formats.files.galore_state import unwrap as unwrap_projector
from ostate.formats.files.pages import page_releaser
from ostate.formats.files.torchao_state import quant_of, unwrap
from ostate.formats.naming.model_order import ModelEntry, Naming, match_model_order
from ostate.state import UNIDENTIFIED, OptimizerState, ParamState, TensorRef

# Group keys that are bookkeeping, not hyperparameters.
_GROUP_LISTS = ("params", "param_names")


def read_optimizer(
    sd: Mapping[str, Any],
    location: str,
    *,
    model: tuple[str, Sequence[ModelEntry]] | None = None,
    configured_kind: str | None = None,
    mapped: bool = False,
) -> OptimizerState:
    """Build the record of one optimizer from its state dict.

    ``model`` is ``(location, entries)`` of a model state dict from the same
    checkpoint, used to name parameters when the optimizer does not carry names.
    The optimizer family is left to :func:`ostate.load` (``kind_source`` is
    ``unidentified``), unless ``configured_kind`` names the family the checkpoint's own
    configuration gives (a DeepSpeed config: ``kind_source`` ``ds_config``). ``mapped`` says the
    tensors live in a memory-mapped file (their pages can be given back after reading).
    """
    raw_groups = list(sd["param_groups"])
    raw_state = sd["state"]
    warnings: list[str] = []

    order: list[tuple[int, Any, str | None]] = []
    for g, group in enumerate(raw_groups):
        names = group.get("param_names")
        if names is None and isinstance(group.get("name"), str) and len(group["params"]) == 1:
            names = [group["name"]]  # Adam-mini: one parameter per group, which it names after the parameter
        for j, pid in enumerate(group["params"]):
            name = names[j] if isinstance(names, (list, tuple)) and j < len(names) else None
            order.append((g, pid, name))
    counts = Counter(_key(pid) for _, pid, _ in order)
    repeated = [str(pid) for pid, c in counts.items() if c > 1]
    if repeated:
        raise OstateError(
            f"parameter index {', '.join(repeated[:5])} is listed in more than one param group",
            where=location,
            hint="the optimizer state dict is inconsistent",
        )

    groups = [{k: _number(v) for k, v in group.items() if k not in _GROUP_LISTS} for group in raw_groups]
    entries = {_key(pid): entry for pid, entry in raw_state.items()}
    listed = {_key(pid) for _, pid, _ in order}
    orphans = [str(pid) for pid in entries if pid not in listed]
    if orphans:
        warnings.append(
            f"state for index {', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''} is not listed in any "
            "param group and is ignored"
        )

    state_keys = frozenset(k for entry in entries.values() if isinstance(entry, Mapping) for k in _flat_entry(entry))
    params: list[ParamState] = []
    for g, pid, name in order:
        entry = entries.get(_key(pid))
        state = _state_values(entry, mapped) if isinstance(entry, Mapping) else {}
        params.append(
            ParamState(
                index=pid,
                name=name or "",
                name_source="param_names" if name else "none",
                group=g,
                shape=param_shape(state),
                step=_step(state.get("step")),
                state=state,
            )
        )

    _name_params(params, model, warnings)
    extra = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}
    model_order = [e.name for e in model[1]] if model is not None else []
    kind, kind_source = (configured_kind, "ds_config") if configured_kind is not None else ("unknown", UNIDENTIFIED)
    return OptimizerState(location, kind, kind_source, groups, params, warnings, extra, model_order, state_keys)


def _number(value: Any) -> Any:
    """A one-element tensor hyperparameter as a Python number (torchao and capturable optimizers keep lr as a
    0-d tensor), anything else as it is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return value.item()
    return value


def _key(pid: Any) -> Any:
    return int(pid) if isinstance(pid, torch.Tensor) else pid


# bitsandbytes >= 0.45 nests its quantisation tensors under this key in ``state_dict()``
# (so that FSDP does not gather them); its ``load_state_dict`` unwraps them the same way.
# Source: bitsandbytes/optim/optimizer.py, Optimizer8bit.state_dict / load_state_dict.
BNB_NESTED_KEY = "__bnb_optimizer_quant_state__"


def _flat_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One parameter's state with bitsandbytes' nested quantisation state unwrapped."""
    flat = dict(entry)
    nested = flat.pop(BNB_NESTED_KEY, None)
    if isinstance(nested, Mapping):
        flat.update(nested)
    for key, value in list(flat.items()):
        if quant_of(value) is not None:  # torchao's low-bit state: its dequantised values and its quantisation
            flat.update(unwrap(key, value))
        elif is_projector(value):  # GaLore's projector: its matrix and settings
            del flat[key]
            flat.update(unwrap_projector(key, value))
    return flat


def _state_values(entry: Mapping[str, Any], mapped: bool) -> dict[str, Any]:
    return {k: tensor_ref(v, mapped) if isinstance(v, torch.Tensor) else v for k, v in _flat_entry(entry).items()}


def tensor_ref(tensor: torch.Tensor, mapped: bool) -> TensorRef:
    """A reference to a loaded tensor; one from a memory-mapped file can give its pages back."""
    return TensorRef.of(tensor, page_releaser(tensor) if mapped else None)


def _step(value: Any) -> float | None:
    if isinstance(value, TensorRef):
        return float(value.read().reshape(-1)[0]) if value.numel >= 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range: no real step count; the analysis says so
            return math.inf if value > 0 else -math.inf
    return None


def param_shape(state: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The parameter's shape as its saved state records it, or ``None`` when the state cannot tell.

    Most optimizers keep a moment of the parameter's shape: the largest state tensor of one
    or more dimensions has it (when only one shape has that size). A few state layouts,
    each told by keys only it uses, say it otherwise:

    - torch's Adafactor: ``variance``, or the factored ``row_var`` and ``col_var``;
    - transformers' Adafactor (``RMS``): ``exp_avg`` or ``exp_avg_sq``, or the factored
      ``exp_avg_sq_row`` and ``exp_avg_sq_col``;
    - bitsandbytes (``state1``): ``state1``, beside smaller quantisation tables;
    - GaLore (``projector_ortho``): the projected ``exp_avg`` and the projection matrix;
    - Adam-mini's per-head blocks (``head_per_gpu``): ``m`` is viewed as (heads, head size),
      so the state does not tell (the model's entry of the same name does);
    - L-BFGS: one flat state for all parameters, which says nothing of any one.

    tests/test_naming.py checks these keys against the families' own.

    Example:
        >>> row, col = TensorRef.of(torch.zeros(4)), TensorRef.of(torch.zeros(3))
        >>> param_shape({"RMS": 0.0, "exp_avg_sq_row": row, "exp_avg_sq_col": col})
        (4, 3)
    """
    tensors = {k: v for k, v in state.items() if isinstance(v, TensorRef)}
    keys = set(state)
    if keys & LBFGS_KEYS or keys & ADAM_MINI_HEAD_KEYS:
        return None
    if "projector_ortho" in tensors and "exp_avg" in tensors:
        return _galore_shape(tensors["exp_avg"].shape, tensors["projector_ortho"].shape, state.get("projector_rank"))
    if keys & ADAFACTOR_KEYS:
        if "variance" in tensors:
            return tuple(tensors["variance"].shape)
        return _factored(tensors, "row_var", "col_var", rows=slice(None, -1))
    if keys & HF_ADAFACTOR_KEYS:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in tensors:
                return tuple(tensors[key].shape)
        return _factored(tensors, "exp_avg_sq_row", "exp_avg_sq_col", rows=slice(None))
    if keys & BNB_KEYS:
        return tuple(tensors["state1"].shape) if "state1" in tensors else None
    shaped = [t for t in tensors.values() if len(t.shape) >= 1]
    if not shaped:
        return None
    largest = max(t.numel for t in shaped)
    shapes = {t.shape for t in shaped if t.numel == largest}
    return next(iter(shapes)) if len(shapes) == 1 else None


def _galore_shape(moment: tuple[int, ...], ortho: tuple[int, ...], rank: Any) -> tuple[int, ...] | None:
    """A GaLore parameter's shape from its projected moment and projection: (m, r) and (r, n) project
    from the right, (r, n) and (m, r) from the left."""
    if len(moment) != 2 or len(ortho) != 2:
        return None
    if moment[1] == ortho[0] == rank:
        return (moment[0], ortho[1])
    if moment[0] == ortho[1] == rank:
        return (ortho[0], moment[1])
    return None


def _factored(tensors: Mapping[str, TensorRef], row: str, col: str, rows: slice) -> tuple[int, ...] | None:
    if row in tensors and col in tensors:
        return tuple(tensors[row].shape[rows]) + tuple(tensors[col].shape[-1:])
    return None


# The keys that tell the state layouts apart whose shape is not their largest tensor's.
ADAFACTOR_KEYS = frozenset({"variance", "row_var", "col_var"})  # torch.optim.Adafactor
HF_ADAFACTOR_KEYS = frozenset({"RMS"})  # transformers.optimization.Adafactor
BNB_KEYS = frozenset({"state1"})  # bitsandbytes' optimizers
LBFGS_KEYS = frozenset({"func_evals", "n_iter", "old_dirs", "old_stps", "prev_flat_grad"})  # torch.optim.LBFGS
ADAM_MINI_HEAD_KEYS = frozenset({"head_per_gpu"})  # adam_mini.Adam_mini's query and key blocks


def _name_params(params: list[ParamState], model, warnings: list[str]) -> None:
    if all(p.name_source == "param_names" for p in params) and params:
        _check_named_shapes(params, model, warnings)
        return
    if all(isinstance(p.index, str) for p in params) and params:
        for p in params:
            p.name, p.name_source = cast(str, p.index), "fqn"  # all str: checked above
        _check_named_shapes(params, model, warnings)
        return
    naming = Naming([None] * len(params), "none")
    if model is not None:
        location, entries = model
        sizes = [sum(1 for p in params if p.group == g) for g in range(max(p.group for p in params) + 1)]
        naming = match_model_order([p.shape for p in params], entries, location, sizes)
        warnings.extend(naming.warnings)
    apply_naming(params, naming)


def apply_naming(params: Sequence[ParamState], naming: Naming) -> None:
    """Give each parameter its name from ``naming`` (``param.<index>`` and source ``none`` where it has none).

    A parameter without state gets its shape from the matched model entry.
    """
    for p, name, shape in zip(params, naming.names, naming.shapes or [None] * len(params)):
        if name is not None:
            p.name, p.name_source = name, naming.source
            if p.shape is None:
                p.shape = shape
        else:
            p.name, p.name_source = f"param.{p.index}", "none"


def _check_named_shapes(params: list[ParamState], model, warnings: list[str]) -> None:
    if model is None:
        return
    location, entries = model
    shapes = {e.name: e.shape for e in entries}
    bad = [p for p in params if p.name in shapes and p.shape is not None and tuple(p.shape) != shapes[p.name]]
    for p in bad[:5]:
        assert p.shape is not None  # bad holds only parameters with a shape
        warnings.append(
            f"'{p.name}' has state of shape {tuple(p.shape)} but the model state dict at '{location}' "
            f"has shape {shapes[p.name]}"
        )
    for p in params:
        if p.shape is None and p.name in shapes:
            p.shape = shapes[p.name]
