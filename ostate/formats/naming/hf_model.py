"""A Hugging Face model's parameter order and the Trainer's weight-decay groups, rebuilt from ``config.json``.

The Trainer builds its optimizer from ``model.named_parameters()`` in two groups
(``transformers/trainer.py::Trainer.create_optimizer``): first every trainable
parameter that gets weight decay, then every trainable one that does not, each in
``named_parameters()`` order. A checkpoint keeps neither the order nor the names
(``model.safetensors`` sorts its keys), so the model is rebuilt here from its
``config.json`` on the meta device: no weights, no download, no memory, no remote
code. Which parameters get decay changed over transformers' history; each rule
below is written from the source of the versions that used it:

- ``transformers>=4.53`` (4.53 to 5.x, ``Trainer.get_decay_parameter_names``): no
  decay inside ``nn.LayerNorm`` modules or when the lower-cased name matches
  ``bias``, ``layernorm``, ``rmsnorm``, ``(^|.)norm($|.)`` or ``_norm($|.)``.
- ``transformers 4.49-4.52``: no decay inside ``ALL_LAYERNORM_LAYERS`` modules or
  when the lower-cased name contains ``bias``, ``layernorm`` or ``rmsnorm``.
- ``transformers<4.49``: no decay inside ``ALL_LAYERNORM_LAYERS`` modules or when the
  name contains ``bias`` (case-sensitive).

``ALL_LAYERNORM_LAYERS`` (``transformers/pytorch_utils.py``) is ``[nn.LayerNorm]``
plus the classes that model files append to it on import
(:data:`LEGACY_LAYERNORM_CLASSES`, listed from transformers 4.48.0 and 4.51.0).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ostate.formats.naming.model_order import ModelEntry
from ostate.formats.naming.module_kinds import module_kinds

# Classes appended to transformers.pytorch_utils.ALL_LAYERNORM_LAYERS by model files
# (`ALL_LAYERNORM_LAYERS.append(...)`), the same set in transformers 4.48.0 and 4.51.0.
LEGACY_LAYERNORM_CLASSES = frozenset(
    {
        "ChameleonRMSNorm",
        "CohereLayerNorm",
        "GraniteMoeRMSNorm",
        "IdeficsRMSNorm",
        "LlamaRMSNorm",
        "LongT5LayerNorm",
        "MegaSequenceNorm",
        "MoshiRMSNorm",
        "NemotronLayerNorm1P",
        "Olmo2RMSNorm",
        "OlmoeRMSNorm",
        "Pix2StructLayerNorm",
        "Pop2PianoLayerNorm",
        "RecurrentGemmaRMSNorm",
        "SwitchTransformersLayerNorm",
        "T5LayerNorm",
        "ZambaRMSNorm",
    }
)
# Why names are missing when transformers is not there (``ostate reset --params`` repeats it).
NO_TRANSFORMERS = "transformers is not installed (pip install 'ostate[hf]')"
_NAME_PATTERNS = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]


@dataclass(frozen=True)
class DecayRule:
    """One version of the Trainer's choice of which parameters get weight decay."""

    name: str
    first: tuple[int, int] | None  # first (major, minor) that used it
    last: tuple[int, int] | None  # last one, inclusive
    no_decay: Callable[[str, bool], bool]  # (name, inside a norm module of this rule) -> excluded from decay
    legacy_norms: bool  # ALL_LAYERNORM_LAYERS (with model-specific classes) rather than nn.LayerNorm only

    def applies_to(self, version: tuple[int, int] | None) -> bool:
        if version is None:
            return False
        return (self.first is None or version >= self.first) and (self.last is None or version <= self.last)


DECAY_RULES: tuple[DecayRule, ...] = (
    DecayRule(
        "transformers>=4.53",
        (4, 53),
        None,
        lambda name, in_norm: in_norm or any(p.search(name.lower()) for p in _NAME_PATTERNS),
        False,
    ),
    DecayRule(
        "transformers 4.49-4.52",
        (4, 49),
        (4, 52),
        lambda name, in_norm: in_norm or any(s in name.lower() for s in ("bias", "layernorm", "rmsnorm")),
        True,
    ),
    DecayRule("transformers<4.49", None, (4, 48), lambda name, in_norm: in_norm or "bias" in name, True),
)


@dataclass
class ModuleOrder:
    """A model rebuilt from ``config.json``: its parameters in ``named_parameters()`` order."""

    architecture: str
    entries: list[ModelEntry]
    decay: dict[str, frozenset[str]]  # rule name -> names that get weight decay
    version: str | None  # transformers_version recorded in config.json
    kinds: dict[str, str] = field(default_factory=dict)  # norm / embedding, from the module types

    @property
    def where(self) -> str:
        return f"{self.architecture} rebuilt from config.json"

    def rules(self) -> list[DecayRule]:
        """The decay rules, the one of the recorded transformers version first."""
        version = parse_version(self.version)
        return sorted(DECAY_RULES, key=lambda r: not r.applies_to(version))


def parse_version(text: str | None) -> tuple[int, int] | None:
    """``"4.57.1"`` -> ``(4, 57)``.

    Example:
        >>> parse_version("5.23.0"), parse_version("4.48.0.dev0"), parse_version(None)
        ((5, 23), (4, 48), None)
    """
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def rebuild(directory: str) -> tuple[ModuleOrder | None, str | None]:
    """The model described by ``directory/config.json``, rebuilt on the meta device.

    Returns ``(order, None)``, or ``(None, reason)`` when it cannot be rebuilt (no
    config, transformers not installed, a model class outside transformers).
    """
    built, why = build_on_meta(directory)
    if built is None:
        return None, why
    model, raw, architecture = built
    return module_order(model, architecture, raw.get("transformers_version")), None


def module_order(
    model: nn.Module, architecture: str, version: str | None, rename: Callable[[str], str] = str
) -> ModuleOrder:
    """A model's trainable parameters in ``named_parameters()`` order with each decay rule's choice.

    ``rename`` maps a parameter's name in the model to the name the checkpoint uses (PEFT
    saves adapter weights without the adapter's name).
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    entries = [ModelEntry(rename(n), tuple(p.shape)) for n, p in trainable]
    decay = {rule.name: frozenset(rename(n) for n in decay_parameter_names(model, rule)) for rule in DECAY_RULES}
    kinds = {rename(n): kind for n, kind in module_kinds(model).items()}
    return ModuleOrder(architecture, entries, decay, version, kinds)


def build_on_meta(directory: str) -> tuple[tuple[nn.Module, dict[str, Any], str] | None, str | None]:
    """``((model, config.json as read, architecture), None)`` for ``directory/config.json``, or ``(None, reason)``."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        return None, "no config.json to rebuild the model from"
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"config.json is not readable JSON ({e})"
    try:
        # optional dependency (ostate[hf])
        import transformers
    except ImportError:
        return None, NO_TRANSFORMERS
    architectures = raw.get("architectures") or []
    name = architectures[0] if architectures else None
    model_class = getattr(transformers, name, None) if name else None
    if name and model_class is None:
        return (
            None,
            f"the model class {name} is not part of transformers {transformers.__version__} (custom code is never run)",
        )
    verbosity = transformers.logging.get_verbosity()
    try:
        transformers.logging.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
            with torch.device("meta"):
                model = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
    except Exception as e:  # any failure of a foreign library to build the model: explain, fall back
        return None, f"transformers could not rebuild the model from config.json ({type(e).__name__}: {e})"[:300]
    finally:
        transformers.logging.set_verbosity(verbosity)
    return (model, raw, name or type(model).__name__), None


def decay_parameter_names(model: nn.Module, rule: DecayRule) -> list[str]:
    """The names (``named_parameters()`` order) that get weight decay under ``rule``.

    A parameter is inside a norm module when any module on its path below the root
    is one (``trainer_pt_utils.get_parameter_names`` tests each child it descends
    into); the name tests of the newer rules run on every suffix of the name there,
    which for these patterns is the same as testing the full name.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> decay_parameter_names(m, DECAY_RULES[0])
        ['0.weight']
    """
    norms = {
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if name and _is_norm(module, rule.legacy_norms)
    }
    out = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        in_norm = any(".".join(parts[:k]) in norms for k in range(1, len(parts)))
        if not rule.no_decay(name, in_norm):
            out.append(name)
    return out


def _is_norm(module: Any, legacy: bool) -> bool:
    if isinstance(module, nn.LayerNorm):
        return True
    return legacy and any(cls.__name__ in LEGACY_LAYERNORM_CLASSES for cls in type(module).__mro__)
