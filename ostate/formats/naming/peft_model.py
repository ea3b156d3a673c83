"""A PEFT (LoRA, ...) model's trainable parameters in the Trainer's order, rebuilt from the adapter's config.

A Trainer checkpoint of a PEFT model holds ``adapter_model.safetensors`` (sorted keys,
no order) and ``adapter_config.json``, but no ``config.json``: the Trainer's optimizer
holds the trainable parameters of the ``PeftModel`` in its ``named_parameters()`` order
(decay group, then no-decay group; :mod:`ostate.formats.naming.hf_model`). That order
comes from the base model's structure, so it is rebuilt on the meta device: the base
model from its ``config.json``, wrapped by PEFT with the checkpoint's adapter config,
and each trainable parameter named as PEFT writes it in ``adapter_model.safetensors``
(``peft.utils.get_peft_model_state_dict``: without the adapter's name).

The base model's ``config.json`` is found, in this order: the folder the user gives
(``base_config=``, ``--base-config DIR``); ``base_model_name_or_path`` of the adapter
config when it is a local folder; the same name in the local Hugging Face cache
(``huggingface_hub.try_to_load_from_cache``). Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Any

import torch

from ostate.formats.naming.hf_model import NO_TRANSFORMERS, ModuleOrder, build_on_meta, module_order

ADAPTER_CONFIG = "adapter_config.json"
NO_PEFT = "peft is not installed (pip install peft)"


def is_adapter_checkpoint(directory: str) -> bool:
    """Whether ``directory`` holds a PEFT adapter (``adapter_config.json``)."""
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG))


def find_base_config(directory: str, base_config: str | os.PathLike | None = None) -> tuple[str | None, str]:
    """The folder holding the base model's ``config.json``, and where it was found (or why none was)."""
    if base_config is not None:
        folder = os.fspath(base_config)
        if os.path.isfile(folder) and os.path.basename(folder) == "config.json":
            folder = os.path.dirname(folder) or "."
        if not os.path.isfile(os.path.join(folder, "config.json")):
            return None, f"the base model folder given ({folder}) holds no config.json"
        return folder, f"base model config from {folder}"
    adapter = _adapter_config(directory)
    name = adapter.get("base_model_name_or_path") if isinstance(adapter, dict) else None
    if not isinstance(name, str) or not name:
        return None, f"{ADAPTER_CONFIG} names no base model; give its folder with base_config=DIR"
    for folder in (name, os.path.join(directory, name)):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder, f"base model config from {folder}"
    cached = _from_hf_cache(name)
    if cached is not None:
        return cached, f"base model config of {name} from the local Hugging Face cache"
    return None, (
        f"the base model {name} is neither a local folder nor in the local Hugging Face cache (nothing is "
        "downloaded); give its folder with base_config=DIR"
    )


def rebuild_adapter(directory: str, base_folder: str) -> tuple[ModuleOrder | None, str | None]:
    """The PEFT model's trainable parameters (PEFT's saved names) in order, or ``(None, reason)``."""
    built, why = build_on_meta(base_folder)
    if built is None:
        return None, why if why != NO_TRANSFORMERS else NO_TRANSFORMERS
    model, raw, architecture = built
    try:
        # optional dependency; its import prints other libraries' notices, kept off the user's terminal
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            import peft
            from peft.utils import get_peft_model_state_dict
    except ImportError:
        return None, NO_PEFT
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = peft.PeftConfig.from_pretrained(directory)
            config.inference_mode = False  # saved as True; training marks the adapter trainable, as the Trainer had it
            with torch.device("meta"):
                wrapped = peft.get_peft_model(model, config)
            saved = get_peft_model_state_dict(wrapped, state_dict=wrapped.state_dict(keep_vars=True))
    except Exception as e:  # any failure of a foreign library to build the model: explain, fall back
        return None, f"peft could not wrap the base model with {ADAPTER_CONFIG} ({type(e).__name__}: {e})"[:300]
    saved_name = {id(v): k for k, v in saved.items()}
    own = {n: saved_name.get(id(p), n) for n, p in wrapped.named_parameters()}
    order = module_order(
        wrapped, f"{architecture} with {config.peft_type} adapter", raw.get("transformers_version"), own.__getitem__
    )
    return order, None


def _adapter_config(directory: str) -> Any:
    try:
        with open(os.path.join(directory, ADAPTER_CONFIG), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _from_hf_cache(name: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache  # comes with transformers
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a repository id (a path that does not exist): nothing cached under it
        return None
    return os.path.dirname(found) if isinstance(found, str) else None
