"""Reader for Hugging Face Trainer ``checkpoint-N/`` directories.

``transformers/trainer.py`` (``_save_checkpoint``) writes ``optimizer.pt`` (a plain
``torch.optim`` state dict; ``optimizer.bin`` or a DCP folder ``optimizer_0/`` under
FSDP), ``scheduler.pt``, ``trainer_state.json`` (global step, epoch, log history),
``rng_state.pth`` (``rng_state_<rank>.pth`` with several processes),
``training_args.bin``, and the model through ``save_pretrained``:
``model.safetensors`` or shards with ``model.safetensors.index.json``
(``pytorch_model.bin`` in older versions), with ``config.json``.

The optimizer carries no names, and ``model.safetensors`` keeps no order, so names
come from rebuilding the model from ``config.json`` (:mod:`ostate.formats.naming.hf_model`)
and the Trainer's decay / no-decay grouping, every shape checked against the state
(``hf-decay-rule``); failing that, from the rebuilt order alone with the groups
interleaved (``model-order``); failing that, from unique shapes in the saved weights
(``shape-match``). ``training_args.bin`` and the RNG files need pickled Python
objects and are never opened.

A DeepSpeed run's checkpoint (``global_step<N>/`` inside, no ``optimizer.pt``) is
left to a DeepSpeed reader; :func:`trainer_metadata` is there for it to reuse.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ostate.errors import OstateError
from ostate.formats import accelerate
from ostate.formats.naming.hf_model import ModuleOrder, parse_version, rebuild
from ostate.formats.naming.model_order import Naming, match_model_order
from ostate.formats.naming.peft_model import ADAPTER_CONFIG, find_base_config, is_adapter_checkpoint, rebuild_adapter
from ostate.formats.naming.torch_optim import apply_naming
from ostate.formats.naming.weights import Weights, find_weights, name_by_weights
from ostate.formats.reader import Reader
from ostate.state import Checkpoint, OptimizerState

TRAINER_STATE = "trainer_state.json"


def sniff(path: str) -> int:
    if not os.path.isdir(path):
        return 0
    names = set(os.listdir(path))
    if accelerate.optimizer_sources(path) and (TRAINER_STATE in names or "config.json" in names):
        return 3
    # A Trainer checkpoint without an optimizer file: this reader explains; a DeepSpeed reader scores higher.
    return 1 if TRAINER_STATE in names else 0


def read(path: str, *, trust_pickle: bool = False, base_config: str | os.PathLike | None = None) -> Checkpoint:
    """Read a Trainer ``checkpoint-N/`` directory (see the module docstring).

    ``base_config``: for a PEFT adapter checkpoint, the folder of the base model's
    ``config.json`` (:mod:`ostate.formats.naming.peft_model` says where it is looked for otherwise).
    """
    if not os.path.isdir(path):
        raise OstateError("not a directory; the Trainer saves checkpoint-N/ directories", where=path)
    sources = accelerate.optimizer_sources(path)
    if not sources:
        raise OstateError(
            "a Trainer checkpoint without optimizer state",
            where=path,
            hint="no optimizer.pt: saved with save_only_model=True; found: {', '.join(sorted(os.listdir(path))) or '(empty)'}",
        )
    metadata, warnings = trainer_metadata(path)
    weights = find_weights(path, trust_pickle=trust_pickle)
    if weights is not None:
        warnings.extend(weights.warnings)
    optimizers = [o for source in sources for o in accelerate.read_source(source, trust_pickle=trust_pickle)]
    if base_config is not None and not is_adapter_checkpoint(path):
        raise OstateError(
            f"base_config names the base model of a PEFT adapter checkpoint, but there is no {ADAPTER_CONFIG} here",
            where=path,
            hint="leave base_config out: the model is rebuilt from the config.json beside the optimizer",
        )
    if any(p.name_source == "none" for o in optimizers for p in o.params):
        order, why = trainer_model_order(path, base_config)
        for o in optimizers:
            name_trainer_params(o, order, why, weights)
    schedulers, scheduler_warnings = accelerate.read_schedulers(path, trust_pickle=trust_pickle)
    if n := accelerate.process_count(path):
        metadata["processes"] = n
    return Checkpoint(
        path=path,
        format="hf-trainer",
        optimizers=optimizers,
        weights=weights.tensors if weights is not None and weights.tensors else None,
        weights_location=weights.location if weights is not None and weights.tensors else None,
        schedulers=schedulers,
        metadata=metadata,
        warnings=warnings + scheduler_warnings,
    )


def trainer_model_order(
    directory: str, base_config: str | os.PathLike | None = None
) -> tuple[ModuleOrder | None, str | None]:
    """The order of the model the Trainer trained: from ``config.json``, or a PEFT model's from its base's."""
    if not is_adapter_checkpoint(directory):
        return rebuild(directory)
    folder, found = find_base_config(directory, base_config)
    if folder is None:
        return None, found
    return rebuild_adapter(directory, folder)


def trainer_metadata(directory: str) -> tuple[dict[str, Any], list[str]]:
    """Global step, epoch, max steps and the last logged learning rate from ``trainer_state.json``.

    Example:
        >>> import tempfile, os, json
        >>> d = tempfile.mkdtemp()
        >>> state = {"global_step": 3, "epoch": 0.5, "log_history": [{"learning_rate": 1e-3, "step": 3}]}
        >>> _ = open(os.path.join(d, "trainer_state.json"), "w").write(json.dumps(state))
        >>> trainer_metadata(d)[0]
        {'global_step': 3, 'epoch': 0.5, 'logged_lr': 0.001, 'logged_lr_step': 3}
    """
    path = os.path.join(directory, TRAINER_STATE)
    if not os.path.isfile(path):
        return {}, []
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        return {}, [f"{TRAINER_STATE} not read ({e})"]
    if not isinstance(state, dict):
        return {}, [f"{TRAINER_STATE} is not a JSON object"]
    meta = {
        k: state[k]
        for k in ("global_step", "epoch", "max_steps")
        if isinstance(state.get(k), (int, float)) and not isinstance(state.get(k), bool)
    }
    logged = [e for e in state.get("log_history") or [] if isinstance(e, dict) and "learning_rate" in e]
    if logged:
        meta["logged_lr"] = logged[-1]["learning_rate"]
        if "step" in logged[-1]:
            meta["logged_lr_step"] = logged[-1]["step"]
    return meta, []


def name_trainer_params(
    optimizer: OptimizerState, order: ModuleOrder | None, why: str | None, weights: Weights | None
) -> None:
    """Name a Trainer optimizer's parameters: decay rule, then rebuilt order, then saved weights."""
    if all(p.name_source != "none" for p in optimizer.params):
        return
    if order is not None:
        conflict = _conflict(order, weights)
        if conflict:
            optimizer.warnings.append(conflict)
            order = None
    if order is not None:
        if _name_by_decay_rule(optimizer, order):
            optimizer.param_kinds = dict(order.kinds)
            return
        sizes = [sum(1 for p in optimizer.params if p.group == g) for g in range(len(optimizer.groups))]
        naming = match_model_order([p.shape for p in optimizer.params], order.entries, order.where, sizes)
        if naming.source != "none":
            apply_naming(optimizer.params, naming)
            optimizer.model_order = [e.name for e in order.entries]
            optimizer.param_kinds = dict(order.kinds)
            return
        optimizer.warnings.extend(naming.warnings)
    elif why:
        optimizer.warnings.append(f"the model's parameter order was not rebuilt: {why}")
    if weights is not None and weights.entries:
        optimizer.warnings.extend(name_by_weights(optimizer, weights).warnings)


def _name_by_decay_rule(optimizer: OptimizerState, order: ModuleOrder) -> bool:
    """Name by the Trainer's two groups (decay, then no decay), each in the model's order; True if one rule fits."""
    if len(optimizer.groups) != 2:
        return False
    members = [[p for p in optimizer.params if p.group == g] for g in (0, 1)]
    fits: list[tuple[str, Naming]] = []
    for candidate in order.rules():
        decay = order.decay[candidate.name]
        sides = ([e for e in order.entries if e.name in decay], [e for e in order.entries if e.name not in decay])
        namings = [
            match_model_order([p.shape for p in group], entries, order.where) for group, entries in zip(members, sides)
        ]
        if all(n.source != "none" for n in namings):
            fits.append(
                (
                    candidate.name,
                    Naming(namings[0].names + namings[1].names, "hf-decay-rule", namings[0].shapes + namings[1].shapes),
                )
            )
    if not fits:
        return False
    rule, naming = fits[0]
    apply_naming(members[0] + members[1], naming)
    optimizer.model_order = [e.name for e in order.entries]
    optimizer.extra["decay_rule"] = rule
    others = [other for other, n in fits[1:] if n.names != naming.names]
    if others:
        optimizer.warnings.append(
            f"names follow the Trainer's decay rule of {rule}; the rule of {others[0]} fits the shapes too and "
            "would name some parameters differently"
        )
    version = parse_version(order.version)
    preferred = order.rules()[0]
    if version is not None and preferred.applies_to(version) and rule != preferred.name:
        optimizer.warnings.append(
            f"the param groups follow the Trainer's decay rule of {rule}, not that of transformers "
            f"{order.version} recorded in config.json"
        )
    return True


def _conflict(order: ModuleOrder, weights: Weights | None) -> str | None:
    if weights is None or not weights.entries:
        return None
    saved = {e.name: e.shape for e in weights.entries}
    for entry in order.entries:
        if entry.name in saved and saved[entry.name] != entry.shape:
            return (
                f"the model rebuilt from config.json disagrees with {weights.location} ('{entry.name}' is "
                f"{saved[entry.name]} there, {entry.shape} rebuilt); its order was not used for names"
            )
    return None


READER = Reader(
    "hf-trainer", "a Hugging Face Trainer checkpoint-N/ directory (optimizer.pt, trainer_state.json, ...)", sniff, read
)
