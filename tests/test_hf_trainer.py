"""Hugging Face Trainer checkpoint-N/ directories written by transformers' own Trainer (tests/helpers/builders.py)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import ostate
from tests.helpers.builders import assert_same_state, by_name, legacy_trainer_class, tiny_qwen2, train_with_trainer
from tests.helpers.common import run_cli

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def qwen2_frozen_run(tmp_path_factory):
    """Qwen2 (RMSNorm, q/k/v biases, untied head) with the embeddings frozen, default Trainer rule."""
    return train_with_trainer(tmp_path_factory.mktemp("qwen2"), tiny_qwen2(), freeze=("model.embed_tokens.weight",))


@pytest.fixture(scope="module")
def qwen2_legacy_run(tmp_path_factory):
    """Qwen2 trained with the decay rule of transformers < 4.49 (its RMSNorm weights get decay there)."""
    return train_with_trainer(
        tmp_path_factory.mktemp("qwen2-legacy"), tiny_qwen2(), trainer_class=legacy_trainer_class()
    )


def copy_checkpoint(run, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(run.checkpoint, target)
    return target


def test_names_come_from_the_trainers_decay_rule_and_match_the_live_optimizer(gpt2_run):
    ckpt = ostate.load(gpt2_run.checkpoint)
    o = ckpt.optimizers[0]
    assert ckpt.format == "hf-trainer" and o.location == "optimizer.pt" and o.kind == "adamw"
    assert [p.name for p in o.params] == gpt2_run.names
    assert {p.name_source for p in o.params} == {"hf-decay-rule"}
    assert o.extra["decay_rule"] == "transformers>=4.53" and o.warnings == []


def test_tied_lm_head_appears_once_and_every_shape_matches_the_model(gpt2_run):
    o = ostate.load(gpt2_run.checkpoint).optimizers[0]
    names = [p.name for p in o.params]
    assert "lm_head.weight" not in names and names.count("transformer.wte.weight") == 1
    shapes = {n: tuple(p.shape) for n, p in gpt2_run.model.named_parameters()}
    assert all(p.shape == shapes[p.name] for p in o.params)


def test_state_equals_the_optimizer_file_loaded_the_plain_way(gpt2_run):
    plain = torch.load(gpt2_run.checkpoint / "optimizer.pt", weights_only=True)
    o = ostate.load(gpt2_run.checkpoint).optimizers[0]
    assert_same_state(o, by_name(plain, gpt2_run.names))
    assert [{k: v for k, v in g.items() if k != "params"} for g in plain["param_groups"]] == o.groups


def test_statistics_equal_those_of_the_plain_load_named_by_the_live_model(gpt2_run):
    plain = torch.load(gpt2_run.checkpoint / "optimizer.pt", weights_only=True)
    ours = ostate.analyze(ostate.load(gpt2_run.checkpoint)).set_index("name")
    reference = ostate.analyze(ostate.from_state_dict(plain, model=gpt2_run.model)).set_index("name")
    numeric = [c for c in reference.columns if reference[c].dtype.kind == "f"]
    assert len(numeric) > 10
    torch.testing.assert_close(
        torch.tensor(ours.loc[reference.index, numeric].to_numpy()),
        torch.tensor(reference[numeric].to_numpy()),
        equal_nan=True,
        rtol=0,
        atol=0,
    )


def test_global_step_epoch_and_the_schedules_lr_are_shown(gpt2_run):
    ckpt = ostate.load(gpt2_run.checkpoint)
    state = json.loads((gpt2_run.checkpoint / "trainer_state.json").read_text())
    assert ckpt.metadata["global_step"] == gpt2_run.global_step == 4
    assert ckpt.metadata["epoch"] == state["epoch"]
    assert ckpt.metadata["logged_lr"] == state["log_history"][-1]["learning_rate"]
    (scheduler,) = ckpt.schedulers
    assert scheduler["_location"] == "scheduler.pt" and scheduler["_last_lr"] == gpt2_run.last_lr
    assert 0 < gpt2_run.last_lr[0] < 1e-3  # mid-schedule: neither warmup nor the end
    out = run_cli("inspect", str(gpt2_run.checkpoint), "--by", "model").stdout
    assert "(hf-trainer)" in out and "global_step=4" in out and "names: hf-decay-rule 28" in out
    assert f"last lr=({gpt2_run.last_lr[0]:.4g}, {gpt2_run.last_lr[1]:.4g})" in out


def test_frozen_parameters_are_not_in_the_optimizer_and_the_rest_are_named(qwen2_frozen_run):
    o = ostate.load(qwen2_frozen_run.checkpoint).optimizers[0]
    assert [p.name for p in o.params] == qwen2_frozen_run.names
    assert "model.embed_tokens.weight" not in qwen2_frozen_run.names
    assert {p.name_source for p in o.params} == {"hf-decay-rule"}
    # RMSNorm weights and biases are in the no-decay group under the current rule
    no_decay = {p.name for p in o.params if p.group == 1}
    assert "model.norm.weight" in no_decay and "model.layers.0.self_attn.q_proj.bias" in no_decay
    plain = torch.load(qwen2_frozen_run.checkpoint / "optimizer.pt", weights_only=True)
    assert_same_state(o, by_name(plain, qwen2_frozen_run.names))


def test_the_legacy_decay_rule_is_recognised_and_a_version_mismatch_is_said(qwen2_legacy_run, tmp_path):
    o = ostate.load(qwen2_legacy_run.checkpoint).optimizers[0]
    assert [p.name for p in o.params] == qwen2_legacy_run.names
    assert o.extra["decay_rule"] == "transformers<4.49"
    assert "model.norm.weight" in {p.name for p in o.params if p.group == 0}  # norms decay under the old rule
    assert any("not that of transformers 5." in w for w in o.warnings)
    # The same checkpoint as transformers 4.48 would have recorded it: no warning.
    old = copy_checkpoint(qwen2_legacy_run, tmp_path)
    config = json.loads((old / "config.json").read_text())
    config["transformers_version"] = "4.48.0"
    (old / "config.json").write_text(json.dumps(config))
    o = ostate.load(old).optimizers[0]
    assert [p.name for p in o.params] == qwen2_legacy_run.names and o.warnings == []


def test_sharded_safetensors_written_by_save_pretrained(gpt2_run, tmp_path):
    target = copy_checkpoint(gpt2_run, tmp_path)
    (target / "model.safetensors").unlink()
    gpt2_run.model.save_pretrained(target, max_shard_size="20KB")
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ckpt = ostate.load(target)
    assert ckpt.weights_location.startswith("model.safetensors.index.json (")
    assert [p.name for p in ckpt.optimizers[0].params] == gpt2_run.names
    wpe = ckpt.weights["transformer.wpe.weight"].read()
    assert torch.equal(wpe, gpt2_run.model.transformer.wpe.weight.detach())


def test_pytorch_model_bin_as_transformers_4_wrote_it(gpt2_run, tmp_path):
    # transformers 4.x save_pretrained(safe_serialization=False) wrote the state dict with torch.save as
    # pytorch_model.bin (modeling_utils.py, WEIGHTS_NAME; save_function=torch.save); 5.x writes only safetensors.
    target = copy_checkpoint(gpt2_run, tmp_path)
    (target / "model.safetensors").unlink()
    torch.save(gpt2_run.model.state_dict(), target / "pytorch_model.bin")
    ckpt = ostate.load(target)
    assert ckpt.weights_location == "pytorch_model.bin"
    assert [p.name for p in ckpt.optimizers[0].params] == gpt2_run.names


def test_a_custom_optimizer_is_named_by_the_rebuilt_model_order(gpt2_run, tmp_path):
    # Trainer(optimizers=(custom, None)) saves whatever groups the user made: here three, by kind.
    model = copy.deepcopy(gpt2_run.model)
    kinds = [lambda n: "wte" in n or "wpe" in n, lambda n: n.endswith(".weight") and "ln" not in n, lambda n: True]
    groups, taken = [], set()
    for kind in kinds:
        names = [n for n, _ in model.named_parameters() if kind(n) and n not in taken]
        taken.update(names)
        groups.append(names)
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam([{"params": [params[n] for n in g]} for g in groups], lr=1e-3)
    model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    optimizer.step()
    target = copy_checkpoint(gpt2_run, tmp_path)
    torch.save(optimizer.state_dict(), target / "optimizer.pt")
    o = ostate.load(target).optimizers[0]
    assert [p.name for p in o.params] == [n for g in groups for n in g]
    assert {p.name_source for p in o.params} == {"model-order"}


def test_without_config_json_unique_shapes_name_what_they_can(gpt2_run, tmp_path):
    target = copy_checkpoint(gpt2_run, tmp_path)
    (target / "config.json").unlink()
    o = ostate.load(target).optimizers[0]
    truth = dict(zip([p.index for p in o.params], gpt2_run.names))
    named = [p for p in o.params if p.name_source == "shape-match"]
    assert named and all(p.name == truth[p.index] for p in named)  # never a wrong name
    assert any(p.name_source == "none" for p in o.params)
    assert any("no config.json" in w for w in o.warnings)
    assert any("left unnamed" in w for w in o.warnings)


def test_a_trainer_checkpoint_without_optimizer_explains(gpt2_run, tmp_path):
    target = copy_checkpoint(gpt2_run, tmp_path)
    (target / "optimizer.pt").unlink()
    with pytest.raises(ostate.OstateError, match="without optimizer state.*save_only_model"):
        ostate.load(target)


def test_the_optimizer_file_alone_points_to_its_directory_for_names(gpt2_run):
    ckpt = ostate.load(gpt2_run.checkpoint / "optimizer.pt")
    assert ckpt.format == "torch" and {p.name_source for p in ckpt.optimizers[0].params} == {"none"}
    assert any("part of a hf-trainer checkpoint directory" in w for w in ckpt.warnings)
