"""PEFT (LoRA) Trainer checkpoints written by transformers' Trainer with peft: names as PEFT writes them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ostate
from tests.helpers.builders import tiny_qwen2, train_with_trainer
from tests.helpers.common import run_cli

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A real Trainer run of a LoRA-wrapped tiny Qwen2 (q/v/o projections: lora_B of q and o share a shape)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    out = tmp_path_factory.mktemp("lora")
    base = tiny_qwen2()
    base.config.architectures = ["Qwen2ForCausalLM"]  # as save_pretrained records it
    base.config.save_pretrained(out / "base")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], lora_alpha=8))
    run = train_with_trainer(out / "run", model)
    # PEFT's own names for the live optimizer's parameters, in the optimizer's order.
    saved = get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True))
    by_id = {id(v): k for k, v in saved.items()}
    live = dict(model.named_parameters())
    return run, out / "base", [by_id[id(live[n])] for n in run.names]


def test_without_a_base_model_the_adapter_stays_unnamed_and_says_how_to_name_it(lora_run):
    run, _, _ = lora_run
    o = ostate.load(run.checkpoint).optimizers[0]
    assert {p.name_source for p in o.params} == {"none"}
    assert any("names no base model; give its folder with base_config=DIR" in w for w in o.warnings)
    result = run_cli("reset", str(run.checkpoint), "--strategy", "reset-m", "--params", "lora_A", "-o", "x")
    assert result.returncode == 2 and "give its folder with --base-config DIR" in result.stderr


def test_base_config_names_every_adapter_parameter_as_peft_saves_it(lora_run):
    run, base, expected = lora_run
    ckpt = ostate.load(run.checkpoint, base_config=base)
    o = ckpt.optimizers[0]
    assert [p.name for p in o.params] == expected
    assert {p.name_source for p in o.params} == {"hf-decay-rule"} and o.warnings == []
    # The names are the keys of adapter_model.safetensors, so the adapter's weights join the rows.
    assert set(expected) == set(ckpt.weights or {})
    assert all(tuple(ckpt.weights[p.name].shape) == p.shape for p in o.params)


def test_a_local_base_model_named_in_the_adapter_config_is_found(lora_run, tmp_path):
    run, base, expected = lora_run
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(run.checkpoint, checkpoint)
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (checkpoint / "adapter_config.json").write_text(json.dumps(config))
    assert [p.name for p in ostate.load(checkpoint).optimizers[0].params] == expected


def test_the_command_line_takes_base_config_and_reset_chooses_by_adapter_name(lora_run, tmp_path):
    run, base, expected = lora_run
    result = run_cli("inspect", str(run.checkpoint), "--base-config", str(base))
    assert result.returncode == 0 and "names: hf-decay-rule 12" in result.stdout and expected[0] in result.stdout
    out = tmp_path / "reset"
    done = run_cli(
        "reset", str(run.checkpoint), "--strategy", "reset-m", "--params", r"lora_A", "--base-config", str(base),
        "-o", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    state = torch.load(out / "optimizer.pt", weights_only=True)["state"]
    for index, name in enumerate(expected):
        assert bool(state[index]["exp_avg"].any()) == ("lora_A" not in name), name


def test_base_config_for_a_checkpoint_without_an_adapter_is_an_error(gpt2_run):
    with pytest.raises(ostate.OstateError, match="no adapter_config.json here"):
        ostate.load(gpt2_run.checkpoint, base_config=gpt2_run.checkpoint)
