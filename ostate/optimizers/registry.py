"""Every optimizer family ostate knows, in one explicit tuple, and how a state is matched to one.

To add a family, write its module (its formula in the docstring, a :class:`~ostate.optimizers.family.Family`
record) and list the record in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ostate.errors import OstateError
from ostate.optimizers import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adam_mini,
    adamax,
    asgd,
    bnb8bit,
    came,
    dadapt,
    dadapt_variants,
    galore,
    generic,
    hf_adafactor,
    lbfgs,
    lion,
    muon,
    nadam,
    radam,
    rmsprop,
    rprop,
    schedulefree,
    schedulefree_variants,
    sgd,
    soap,
    sparse_adam,
    torchao_adam,
)
from ostate.optimizers.family import Family

FAMILIES: tuple[Family, ...] = (
    adadelta.ADADELTA,
    adafactor.ADAFACTOR,
    adam.ADAM,
    adam.ADAMW,
    adam_mini.ADAM_MINI,
    sparse_adam.SPARSE_ADAM,
    adagrad.ADAGRAD,
    adamax.ADAMAX,
    asgd.ASGD,
    bnb8bit.BNB_ADAM,
    bnb8bit.BNB_LION,
    bnb8bit.BNB_MOMENTUM,
    bnb8bit.BNB_RMSPROP,
    bnb8bit.BNB_ADAGRAD,
    came.CAME,
    dadapt.DADAPT_ADAM,
    dadapt_variants.DADAPT_ADAGRAD,
    dadapt_variants.DADAPT_ADAN,
    dadapt_variants.DADAPT_LION,
    dadapt_variants.DADAPT_SGD,
    dadapt.PRODIGY,
    galore.GALORE_ADAMW,
    generic.UNKNOWN,
    hf_adafactor.HF_ADAFACTOR,
    lbfgs.LBFGS,
    lion.LION,
    muon.MUON,
    nadam.NADAM,
    radam.RADAM,
    rmsprop.RMSPROP,
    rprop.RPROP,
    schedulefree.SCHEDULEFREE_ADAMW,
    schedulefree_variants.SCHEDULEFREE_RADAM,
    schedulefree_variants.SCHEDULEFREE_SGD,
    sgd.SGD,
    soap.SOAP,
    torchao_adam.TORCHAO_ADAM,
    torchao_adam.TORCHAO_ADAMW,
)
_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def families() -> dict[str, Family]:
    """Every family by name, in the order of :data:`FAMILIES`.

    Example:
        >>> "adamw" in families() and "unknown" in families()
        True
    """
    return dict(_BY_NAME)


def get_family(name: str) -> Family:
    """The family called ``name``; a clear error listing the known kinds otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise OstateError(
            f"unknown optimizer kind '{name}'", hint=f"known kinds: {', '.join(sorted(_BY_NAME))}"
        ) from None


def detect(state_keys: frozenset[str], groups: Sequence[Mapping[str, Any]]) -> tuple[str, str, list[str]]:
    """The family name that best fits, how it was decided, and the other names that fit as well.

    Returns ``(name, source, also)`` where source is ``detected`` (one clear winner),
    ``assumed`` (a tie, settled by the preferred family) or ``unknown``.

    Example:
        >>> detect(frozenset({"momentum_buffer"}), [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "nesterov": False}])
        ('sgd', 'detected', [])
    """
    scores: dict[str, int] = {}
    for family in FAMILIES:
        if family.name == "unknown":
            continue
        score = min((family.match(state_keys, g) for g in groups), default=family.match(state_keys, {}))
        if score > 0:
            scores[family.name] = score
    if not scores:
        return "unknown", "unknown", []
    best = max(scores.values())
    winners = sorted(name for name, s in scores.items() if s == best)
    if len(winners) == 1:
        return winners[0], "detected", []
    preferred = [w for w in winners if _BY_NAME[w].preferred]
    choice = preferred[0] if preferred else winners[0]
    return choice, "assumed", [w for w in winners if w != choice]
