"""The built-in transfer tasks: real data present on every machine, tiny models, minutes on a CPU.

- ``code-to-prose``: a character-level transformer pretrained on the Python standard
  library's source code, fine-tuned on the English prose of the interpreter's help topics;
- ``gpt-code-to-prose``: the same transfer with a GPT-style model of about 4.8 M
  parameters and LLM settings (AdamW with beta2 0.95 and weight decay 0.1, warmup and
  cosine, clipping at 1.0); ``new_head=True`` fine-tunes a new output layer;
- ``sans-to-serif``: a CNN that recognises digits and capital letters, pretrained on
  sans-serif fonts, fine-tuned on serif fonts (the fonts that ship with matplotlib).

When no source checkpoint is given, the source model is pretrained once (about a
minute; on the GPU when there is one) and cached (see
:func:`ostate.harness.task.resolve_source`); a source pretrained on a GPU is cached
apart from one pretrained on the CPU (they round differently).
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType
from typing import Any

import torch

from ostate.errors import OstateError
from ostate.harness.device import AUTO, resolve_device
from ostate.harness.task import Task
from ostate.harness.tasks import code_to_prose, gpt_code_to_prose, sans_to_serif

TASKS = ("code-to-prose", "gpt-code-to-prose", "sans-to-serif")
PRETRAIN_STEPS = {"code-to-prose": 1500, "gpt-code-to-prose": 1000, "sans-to-serif": 600}


def builtin_task(
    name: str,
    *,
    pretrain_steps: int | None = None,
    progress: bool | str = True,
    new_head: bool = False,
    device: str = AUTO,
) -> Task:
    """A built-in task by name; ``pretrain_steps`` sets how long its source model trains;
    ``new_head`` fine-tunes a new output layer (``gpt-code-to-prose`` only); ``device``
    where the source model is pretrained (:func:`~ostate.harness.device.resolve_device`).

    Example:
        >>> builtin_task("sans-to-serif").defaults["lr"]
        0.001
    """
    if name not in TASKS:
        raise OstateError(f"unknown task '{name}'", hint=f"built-in tasks: {', '.join(TASKS)}")
    steps = PRETRAIN_STEPS[name] if pretrain_steps is None else pretrain_steps
    versions = f"py{sys.version_info[0]}.{sys.version_info[1]}-torch{torch.__version__.split('+')[0]}-s{steps}"
    on = resolve_device(device)
    if on.type != "cpu":  # the CPU's cached sources keep their names
        versions += f"-{on.type}"
    if new_head and name != "gpt-code-to-prose":
        raise OstateError(f"task '{name}' has no new-head variant", hint="gpt-code-to-prose has one")
    if name == "code-to-prose":
        module: ModuleType = code_to_prose
        parts: dict[str, Any] = dict(
            model=code_to_prose.TinyGPT,
            train_batches=code_to_prose.prose_batches,
            loss=code_to_prose.next_char_loss,
            evaluate=code_to_prose.evaluate_prose,
            source_evaluate=code_to_prose.evaluate_code,
            source_batches=code_to_prose.code_batches,
            validate=code_to_prose.validate_prose,
            description="character transformer: stdlib source code -> English help text",
            defaults={"lr": 1e-3, "batch_size": 32, "steps": 200, "eval_every": 20},
        )
    elif name == "gpt-code-to-prose":
        module = gpt_code_to_prose
        parts = dict(
            model=gpt_code_to_prose.GPTNewHead if new_head else gpt_code_to_prose.gpt,
            train_batches=gpt_code_to_prose.prose_batches,
            loss=code_to_prose.next_char_loss,
            evaluate=gpt_code_to_prose.evaluate_prose,
            source_evaluate=gpt_code_to_prose.evaluate_code,
            source_batches=gpt_code_to_prose.code_batches,
            validate=gpt_code_to_prose.validate_prose,
            description="GPT-style transformer (4.8 M parameters, LLM settings): stdlib source code -> English help text"
            + (", new output layer" if new_head else ""),
            defaults={"lr": 3e-4, "batch_size": 16, "steps": 200, "eval_every": 20, "warmup": 20, "grad_clip": 1.0},
        )
    else:
        module = sans_to_serif
        parts = dict(
            model=sans_to_serif.GlyphCNN,
            train_batches=sans_to_serif.target_batches,
            loss=sans_to_serif.classification_loss,
            evaluate=sans_to_serif.evaluate_target,
            source_evaluate=sans_to_serif.evaluate_source,
            source_batches=sans_to_serif.source_batches,
            validate=sans_to_serif.validate_target,
            description="glyph CNN: sans-serif fonts -> serif fonts (36 classes)",
            defaults={"lr": 1e-3, "batch_size": 32, "steps": 200, "eval_every": 20},
        )
    return Task(
        name=name + ("-new-head" if new_head else ""),
        pretrain=functools.partial(module.pretrain_source, steps=steps, progress=progress, device=str(on)),
        fingerprint=f"{versions}-{module.data_fingerprint()}",
        **parts,
    )
