"""The fallback for state that no family recognises: plain statistics of every state tensor.

No effective learning rate or next update is claimed for an unknown optimizer; each
state tensor that has the parameter's shape is summarised as it is (signed values),
under its own key.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.optimizers.family import Family, Group
from ostate.state import ParamState


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    return {key: values for key, values in chunk.items()}


UNKNOWN = Family(
    name="unknown",
    label="unrecognised optimizer",
    match=lambda state_keys, group: 0,
    quantities=quantities,
    hyperparameters=("lr", "initial_lr", "weight_decay"),
)
