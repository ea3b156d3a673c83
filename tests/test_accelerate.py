"""Directories written by accelerate's own Accelerator.save_state (tests/helpers/builders.py)."""

from __future__ import annotations

import shutil

import pytest
import torch

import ostate
from tests.helpers.builders import assert_same_state, by_name
from tests.helpers.common import run_cli

pytest.importorskip("accelerate")


def test_both_optimizers_are_found_in_file_order(accelerate_run):
    ckpt = ostate.load(accelerate_run.directory)
    assert ckpt.format == "accelerate"
    assert [(o.location, o.kind) for o in ckpt.optimizers] == [("optimizer.bin", "adamw"), ("optimizer_1.bin", "sgd")]
    assert ckpt.weights_location == "model.safetensors (+1 more models)"


def test_state_equals_each_optimizer_file_loaded_the_plain_way(accelerate_run):
    ckpt = ostate.load(accelerate_run.bin_directory)
    for i, o in enumerate(ckpt.optimizers):
        name = "optimizer.bin" if i == 0 else f"optimizer_{i}.bin"
        plain = torch.load(accelerate_run.bin_directory / name, weights_only=True)
        assert_same_state(o, by_name(plain, accelerate_run.names[i]))
        live = accelerate_run.optimizers[i].state_dict()
        assert [{k: v for k, v in g.items() if k != "params"} for g in live["param_groups"]] == o.groups


def test_bin_weights_keep_the_model_order_and_name_every_parameter(accelerate_run):
    ckpt = ostate.load(accelerate_run.bin_directory)
    for o, names in zip(ckpt.optimizers, accelerate_run.names):
        assert [p.name for p in o.params] == names
        assert {p.name_source for p in o.params} == {"model-order"}


def test_safetensors_weights_name_only_parameters_with_a_unique_shape(accelerate_run):
    # model.safetensors keeps its keys sorted, so a shape shared by several entries cannot be told apart.
    generator, critic = ostate.load(accelerate_run.directory).optimizers
    truth = accelerate_run.names[0]
    sources = {p.name_source for p in generator.params}
    assert sources == {"shape-match", "none"}
    for p, true_name in zip(generator.params, truth):
        if p.name_source == "shape-match":
            assert p.name == true_name
    # inp.bias, norm.weight and norm.bias are all of shape (8,)
    assert [p.name_source for p in generator.params if p.shape == (8,)] == ["none"] * 3
    assert any("left unnamed" in w for w in generator.warnings)
    # the critic's shapes are all distinct: model_1.safetensors names every one
    assert [p.name for p in critic.params] == accelerate_run.names[1]


def test_scheduler_and_process_count_are_read(accelerate_run):
    ckpt = ostate.load(accelerate_run.directory)
    (scheduler,) = ckpt.schedulers
    assert scheduler["_location"] == "scheduler.bin" and scheduler["_last_lr"] == [1e-2 * 0.5**3]
    assert ckpt.metadata["processes"] == 1


def test_optimizer_index_picks_one_in_the_cli(accelerate_run):
    out = run_cli("inspect", str(accelerate_run.bin_directory), "--optimizer-index", "1").stdout
    assert "optimizer at 'optimizer_1.bin': SGD" in out and "optimizer.bin'" not in out


@pytest.mark.slow
def test_fsdp_optimizer_folder_is_read_as_dcp(dcp_sharded, tmp_path):
    # accelerate's save_fsdp_optimizer writes optimizer_<i>/ as DCP holding {"optimizer": ...}.
    ckpt = ostate.load(dcp_sharded / "accelerate")
    (o,) = ckpt.optimizers
    assert ckpt.format == "accelerate" and o.location == "optimizer_0/optimizer"
    oracle = torch.load(dcp_sharded / "oracle.pt", weights_only=True)["optimizer"]
    assert_same_state(o, oracle["state"])
    assert {p.name_source for p in o.params} == {"fqn"}


def test_format_hint_reads_a_trainer_folder_as_accelerate(accelerate_run, tmp_path):
    target = tmp_path / "state"
    shutil.copytree(accelerate_run.bin_directory, target)
    (target / "trainer_state.json").write_text("{}")
    assert ostate.load(target).format == "hf-trainer"
    assert ostate.load(target, format_hint="accelerate").format == "accelerate"
