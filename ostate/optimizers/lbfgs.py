r"""L-BFGS, as ``torch.optim.LBFGS`` keeps its state: summarised, not differentiated per coordinate.

torch's LBFGS works on all parameters flattened into one vector and keeps its whole
state under the *first* parameter: ``func_evals`` and ``n_iter`` (counts), ``d`` (the
last search direction) and ``t`` (the last step length along it), the curvature
history ``old_dirs`` (:math:`y_k`, gradient differences) and ``old_stps``
(:math:`s_k`, steps) with ``ro`` (:math:`1/y_k^\top s_k`), ``H_diag`` (the scale
:math:`\gamma_k = s^\top y / y^\top y` of the initial inverse Hessian), ``prev_flat_grad``
and ``prev_loss``. The other parameters have no state.

A step runs up to ``max_iter`` iterations, each re-evaluating the loss through the
closure (and, with ``line_search_fn="strong_wolfe"``, several more per line search),
so the next update depends on the loss function, not only on the state, one gradient
and the weights: ostate gives **no** ``next_update`` for LBFGS. There is no
per-coordinate effective learning rate either: the direction is the two-loop product
of the inverse-Hessian approximation with the gradient, coupling all coordinates. The
first parameter's row carries the summary columns (``n_iter``, ``func_evals``,
``history``, ``H_diag``, ``step_length``, ``prev_loss``, ``direction_norm``,
``grad_norm``, ``flat_numel``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.optimizers.family import Family, Group, group_has, scalar_of
from ostate.state import ParamState

_STATE_KEYS = frozenset(
    {"func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss", "al"}
)


def _norm(param: ParamState, key: str) -> float:
    if key not in param.state or param.state[key] is None:
        return float("nan")
    return float(param.read(key).double().norm())


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    return {}


def columns(param: ParamState, group: Group) -> dict:
    state = param.state
    if "n_iter" not in state:
        return {}
    history = state.get("old_dirs")
    scalar = {
        key: scalar_of(param, key) if state.get(key) is not None else float("nan")
        for key in ("H_diag", "t", "prev_loss")
    }
    d = state.get("d")
    return {
        "n_iter": state["n_iter"],
        "func_evals": state.get("func_evals"),
        "history": len(history) if isinstance(history, (list, tuple)) else 0,
        "H_diag": scalar["H_diag"],
        "step_length": scalar["t"],
        "prev_loss": scalar["prev_loss"],
        "direction_norm": _norm(param, "d"),
        "grad_norm": _norm(param, "prev_flat_grad"),
        "flat_numel": d.numel if d is not None and hasattr(d, "numel") else None,
    }


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ({"n_iter", "func_evals"} <= state_keys <= _STATE_KEYS):
        return 0
    if group_has(group, "max_iter", "history_size", "tolerance_grad"):
        return 5
    return 3 if state_keys else 0


LBFGS = Family(
    name="lbfgs",
    label="L-BFGS",
    match=match,
    quantities=quantities,
    columns=columns,
    display=("n_iter", "func_evals", "history", "H_diag", "step_length", "prev_loss", "grad_norm"),
    hyperparameters=(
        "lr",
        "initial_lr",
        "max_iter",
        "max_eval",
        "history_size",
        "line_search_fn",
        "tolerance_grad",
        "tolerance_change",
    ),
    notes=(
        "L-BFGS: summary only. Its state is flat over all parameters and kept under the first one; the next "
        "step re-evaluates the loss (closure, line search), so neither a per-coordinate effective lr nor "
        "the next update can be computed from the state.",
    ),
)
