"""The built-in gpt-code-to-prose task: its shape, its LLM settings, and its new-head variant."""

from __future__ import annotations

import pytest
import torch

from ostate.harness import TrialConfig, builtin_task, run_trial
from ostate.harness.source import load_source
from ostate.harness.tasks import gpt_code_to_prose


def test_the_gpt_model_has_millions_of_parameters_and_the_new_head_variant_renames_only_the_head():
    model, variant = gpt_code_to_prose.gpt(), gpt_code_to_prose.GPTNewHead()
    count = sum(p.numel() for p in model.parameters())
    assert 4_500_000 < count < 20_000_000
    names, variant_names = {n for n, _ in model.named_parameters()}, {n for n, _ in variant.named_parameters()}
    assert names - variant_names == {"head.weight", "head.bias"}
    assert variant_names - names == {"prose_head.weight", "prose_head.bias"}
    ids = torch.randint(0, 128, (2, 16))
    assert variant(ids).shape == model(ids).shape == (2, 16, 128)


@pytest.mark.slow
def test_the_source_is_trained_with_llm_settings_and_a_new_head_starts_fresh(tmp_path):
    path = str(tmp_path / "source.pt")
    gpt_code_to_prose.pretrain_source(path, steps=2, progress=False)
    source = load_source(path)
    decay, no_decay = source.optimizer_state["param_groups"]
    assert source.kind == "adamw" and decay["betas"] == (0.9, 0.95)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)

    task = builtin_task("gpt-code-to-prose", new_head=True, progress=False)
    task.source = path
    result = run_trial(task, path, TrialConfig("reload", 0, 3e-4, steps=1, eval_every=1, batch_size=2))
    assert task.name == "gpt-code-to-prose-new-head"
    assert sorted(result.info["started_fresh"]) == ["prose_head.bias", "prose_head.weight"]
    assert result.info["carried"] == len(source.names) - 2  # every parameter but the old head
