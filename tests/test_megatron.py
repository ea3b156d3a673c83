"""Megatron distributed-optimizer checkpoints, read without Megatron.

The older layout (``distrib_optim.pt`` + ``model_optim_rng.pt``): megatron-core's distributed
optimizer and its grad buffers need CUDA, so these files are written by
tests/helpers/megatron_ckpt.py, which reproduces megatron-core 0.16.1's layout from its source
(see that module); the optimizer state in them is the real torch AdamW's.

The ``torch_dist`` layout is written by megatron-core's real ``dist_checkpointing.save`` on CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

import ostate
from ostate import OstateError
from ostate.formats import registry
from ostate.formats.dcp.read import Storage
from ostate.formats.megatron import buckets
from ostate.formats.megatron import read as megatron
from ostate.formats.megatron.layers import layer_name, split_layers
from tests.helpers import megatron_ckpt
from tests.helpers.common import REPO, run_cli


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    return megatron_ckpt.write(str(root / "run"))


def test_every_parameter_is_named_and_its_state_is_the_optimizers(saved):
    model, opt, rank_dir = saved
    ckpt = ostate.load(os.path.dirname(os.path.dirname(rank_dir)))  # the save folder
    assert ckpt.format == "megatron" and ckpt.metadata["global_step"] == 3
    o = ckpt.optimizers[0]
    names = [p.name for p in o.params]  # group by group
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(set(names)) == len(names)
    assert o.kind == "adamw"
    for name, w in model.named_parameters():
        p = o.param(name)
        assert p.name_source != "none" and p.step == 3.0 and p.shape == tuple(w.shape)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(p.read(key), opt.state[w][key]), (name, key)
        assert torch.equal(ckpt.weights[name].read(), w.detach())
    wd = {p.name: o.groups[p.group]["weight_decay"] for p in o.params}
    assert wd["decoder.layers.0.mlp.linear_fc1.weight"] == 0.1 and wd["decoder.layers.0.mlp.linear_fc1.bias"] == 0.0
    assert wd["decoder.final_layernorm.weight"] == 0.0
    assert any("default rule" in w for w in o.warnings)


def test_analysis_matches_the_same_optimizer_saved_by_torch(saved, tmp_path):
    model, opt, rank_dir = saved
    plain = tmp_path / "plain.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, plain)
    ours = ostate.analyze(ostate.load(rank_dir)).set_index("name")
    truth = ostate.analyze(ostate.load(plain)).set_index("name")
    numeric = [c for c in truth.columns if pd.api.types.is_numeric_dtype(truth[c]) and c not in ("index", "group")]
    assert len(numeric) > 5
    pd.testing.assert_frame_equal(ours.loc[truth.index, numeric], truth[numeric], check_exact=False, rtol=1e-6)


def test_iteration_folder_rank_folder_and_legacy_per_bucket_files_read_the_same(saved, tmp_path):
    model, opt, rank_dir = saved
    _, _, legacy_dir = megatron_ckpt.write(str(tmp_path / "legacy"), legacy=True)
    reads = [ostate.load(rank_dir), ostate.load(os.path.dirname(rank_dir)), ostate.load(legacy_dir)]
    for ckpt in reads:
        for name, w in model.named_parameters():
            assert torch.equal(ckpt.optimizers[0].param(name).read("exp_avg_sq"), opt.state[w]["exp_avg_sq"])


def test_bf16_model_reads_the_fp32_master_weights_and_moments(tmp_path):
    model, opt, rank_dir = megatron_ckpt.write(str(tmp_path / "bf16"), bf16=True)
    ckpt = ostate.load(rank_dir)
    for name, w in model.named_parameters():
        p = ckpt.optimizers[0].param(name)
        assert torch.equal(p.read("exp_avg"), opt.state[w]["exp_avg"])
        assert ckpt.weights[name].dtype == torch.float32 and torch.equal(ckpt.weights[name].read(), w.detach())


def test_layout_matches_megatrons_buffer_in_several_buckets():
    model = megatron_ckpt.tiny_gpt()
    params = list(model.parameters())
    index, bucket_ranges, unpadded = megatron_ckpt.buffer_layout(params, dp=4, bucket_size=300)
    assert len(unpadded) > 3
    # megatron's absolute index in the padded buffer -> the joined, bucket-unpadded buffer
    joined_start = {}
    base = 0
    for (start, _), n in zip(bucket_ranges, unpadded):
        joined_start[start] = base
        base += n
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    slots, sizes = buckets.layout(named, 300)
    assert sizes == unpadded
    by_name = {s.name: s.offset for s in slots}
    for (name, _), p in zip(named, params):
        start = index[p][0]
        bucket = max(s for s, _ in bucket_ranges if s <= start)
        assert by_name[name] == joined_start[bucket] + start - bucket, name


def test_sniff_and_reader_choice(saved, tmp_path):
    _, _, rank_dir = saved
    run = os.path.dirname(os.path.dirname(rank_dir))
    assert registry.choose(run).name == "megatron"
    assert registry.choose(os.path.dirname(rank_dir)).name == "megatron"
    assert registry.choose(rank_dir).name == "megatron"
    assert megatron.sniff(str(tmp_path)) == 0


def test_a_model_from_another_save_is_one_clear_error(saved, tmp_path):
    _, _, rank_dir = saved
    bad = tmp_path / "iter_0000003" / "mp_rank_00"
    bad.mkdir(parents=True)
    saved_model = torch.load(os.path.join(rank_dir, "model_optim_rng.pt"), weights_only=False)
    saved_model["model"]["output_layer.weight"] = torch.ones(megatron_ckpt.V + 4, megatron_ckpt.H)
    torch.save(saved_model, bad / "model_optim_rng.pt")
    os.link(os.path.join(rank_dir, "distrib_optim.pt"), bad / "distrib_optim.pt")
    with pytest.raises(OstateError, match="do not match the optimizer buffer"):
        ostate.load(bad)
    result = run_cli("inspect", str(bad))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_hostile_and_damaged_files_are_refused_in_one_line(saved, tmp_path):
    _, _, rank_dir = saved
    run = tmp_path / "run"
    (run / "iter_0000003" / "mp_rank_00").mkdir(parents=True)
    (run / "latest_checkpointed_iteration.txt").write_text("../../etc")
    result = run_cli("inspect", str(run), "--format-hint", "megatron")
    assert result.returncode == 2 and "iteration number or 'release'" in result.stderr
    bad = run / "iter_0000003" / "mp_rank_00"
    os.link(os.path.join(rank_dir, "model_optim_rng.pt"), bad / "model_optim_rng.pt")
    torch.save({0: {(torch.float32, torch.float32): {"param": os.system}}}, bad / "distrib_optim.pt")
    result = run_cli("inspect", str(bad))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "posix.system" in result.stderr or "system" in result.stderr


def test_cli_inspect_names_parameters(saved):
    _, _, rank_dir = saved
    result = run_cli("inspect", rank_dir)
    assert result.returncode == 0, result.stderr
    assert "(megatron)" in result.stdout and "decoder.layers.1.mlp.linear_fc2.weight" in result.stdout


# The torch_dist format, written by megatron-core's own dist_checkpointing.save (gloo, one rank)
# in a fresh process (its writer spawns workers and patches two CUDA calls; see the helper).


@pytest.fixture(scope="module")
def torch_dist(tmp_path_factory):
    """A real megatron-core GPTModel (2 stacked layers) saved by dist_checkpointing, and the truth, per parameter."""
    out = tmp_path_factory.mktemp("megatron_dist") / "iter_0000003"
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "tests.helpers.megatron_ckpt", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (out.parent / "latest_checkpointed_iteration.txt").write_text("3")
    saved = torch.load(f"{out}.truth.pt", weights_only=True)
    # ostate's name: the sharded key with the layer number after "layers." (megatron's non-distributed form)
    truth = {layer_name(t["key"], t["layer"]) if t["layer"] is not None else t["key"]: t for t in saved.values()}
    return out, truth


@pytest.mark.slow
def test_torch_dist_layers_are_one_parameter_each_with_the_real_state(torch_dist):
    out, truth = torch_dist
    assert registry.choose(str(out)).name == "megatron" and registry.choose(str(out.parent)).name == "megatron"
    ckpt = ostate.load(out.parent)
    assert ckpt.metadata["megatron_format"] == "torch_dist" and ckpt.metadata["global_step"] == 3
    o = ckpt.optimizers[0]
    names = [p.name for p in o.params]
    assert sorted(names) == sorted(truth) and len(set(names)) == len(names) and o.kind == "adamw"
    assert sum(1 for t in truth.values() if t["layer"] == 1) >= 8  # every module of a layer, per layer
    for name, t in truth.items():
        p = o.param(name)
        assert p.step == 3.0 and p.shape == tuple(t["exp_avg"].shape), name
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(p.read(k), t[k]), (name, k)
        assert torch.equal(ckpt.weights[name].read(), t["fp32_param"]), name
        assert o.groups[p.group]["weight_decay"] == t["weight_decay"], name  # per-layer norms and biases: wd 0
    assert o.groups[o.param("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight").group]["weight_decay"] == 0
    assert not any("kept stacked" in w for w in o.warnings)


@pytest.mark.slow
def test_torch_dist_layer_reads_only_its_own_chunks(torch_dist, monkeypatch):
    out, truth = torch_dist
    p = ostate.load(out).optimizers[0].param("decoder.layers.1.mlp.linear_fc1.weight")
    read = []
    chunk = Storage._chunk

    def counted(self, key, info, sizes, dtype):
        read.append((key, sizes))
        return chunk(self, key, info, sizes, dtype)

    monkeypatch.setattr(Storage, "_chunk", counted)
    assert torch.equal(p.read("exp_avg_sq"), truth["decoder.layers.1.mlp.linear_fc1.weight"]["exp_avg_sq"])
    assert read == [("optimizer.state.exp_avg_sq.decoder.layers.mlp.linear_fc1.weight", (1, 32, 8))]


@pytest.mark.slow
def test_torch_dist_analysis_by_layer_and_matches_the_real_tensors(torch_dist, tmp_path):
    out, truth = torch_dist
    ckpt = ostate.load(out)
    by_layer = ostate.analyze(ckpt, by="layer")
    layers = list(by_layer["layer"])
    assert sorted(layers) == sorted({name.rsplit(".", 1)[0] for name in truth})
    assert [x for x in layers if x.startswith("decoder.layers.")][:2] == [
        "decoder.layers.0.self_attention.linear_qkv",
        "decoder.layers.0.self_attention.linear_proj",
    ]  # the model's order: layer by layer
    assert "decoder.layers.mlp.linear_fc1" not in layers and "decoder.layers.1.mlp.linear_fc1" in layers

    ours = ostate.analyze(ckpt).set_index("name")
    o = ckpt.optimizers[0]
    groups = [dict(g, params=[]) for g in o.groups]
    state = {}
    for p in o.params:
        groups[p.group]["params"].append(p.name)
        state[p.name] = {"step": torch.tensor(3.0), **{k: truth[p.name][k] for k in ("exp_avg", "exp_avg_sq")}}
    plain = tmp_path / "plain.pt"
    model = {k: v["fp32_param"] for k, v in truth.items()}
    torch.save({"model": model, "optimizer": {"state": state, "param_groups": groups}}, plain)
    expected = ostate.analyze(ostate.load(plain)).set_index("name")
    numeric = [
        c for c in expected.columns if pd.api.types.is_numeric_dtype(expected[c]) and c not in ("index", "group")
    ]
    pd.testing.assert_frame_equal(ours.loc[expected.index, numeric], expected[numeric], check_exact=False, rtol=1e-6)


@pytest.mark.slow
def test_torch_dist_layers_stay_stacked_with_a_warning_where_the_count_disagrees(torch_dist, tmp_path):
    out, truth = torch_dist
    other = shutil.copytree(out, tmp_path / "iter_0000003")
    common = torch.load(other / "common.pt", weights_only=False)
    common["args"].num_layers = 3  # not the stored first axis (2): which axis is the layers' is then not known
    torch.save(common, other / "common.pt")
    o = ostate.load(other).optimizers[0]
    stacked = o.param("decoder.layers.mlp.linear_fc1.weight")
    assert stacked.shape == (2, 32, 8) and not any(".layers.0." in p.name for p in o.params)
    assert torch.equal(stacked.read("exp_avg")[1], truth["decoder.layers.1.mlp.linear_fc1.weight"]["exp_avg"])
    assert any("kept stacked" in w and "num_layers (3)" in w for w in o.warnings)
    # the layer axis is discounted for the 1-D rule: a stacked norm is still in the group without weight decay
    assert o.groups[o.param("decoder.layers.mlp.linear_fc1.layer_norm_weight").group]["weight_decay"] == 0


@pytest.mark.slow
def test_torch_dist_damage_is_one_line(torch_dist, tmp_path):
    out, _ = torch_dist
    broken = shutil.copytree(out, tmp_path / "broken")
    (broken / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    data = sorted(broken.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:100])
    result = run_cli("inspect", str(broken))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_expert_keys_stay_stacked_and_are_named_in_a_warning():
    shapes = {
        "decoder.layers.mlp.router.weight": (2, 4, 8),
        "decoder.layers.mlp.experts.linear_fc1.weight": (2, 4, 64, 8),
        "decoder.layers.mlp.experts.linear_fc2.weight": (2, 4, 8, 32),
        "decoder.layers.mlp.shared_experts.linear_fc1.weight": (2, 32, 8),
        "decoder.layers.3.mlp.linear_fc1.weight": (32, 8),  # a layer saved with its number: no added axis
    }
    split, warnings = split_layers(shapes, argparse.Namespace(num_layers=2))
    assert split == {"decoder.layers.mlp.router.weight": 2, "decoder.layers.mlp.shared_experts.linear_fc1.weight": 2}
    assert len(warnings) == 1 and "'decoder.layers.mlp.experts.linear_fc1.weight' and 1 more" in warnings[0]


def test_a_distrib_optim_file_of_another_shape_is_one_clear_error(saved, tmp_path):
    _, _, rank_dir = saved
    bad = tmp_path / "mp_rank_00"
    bad.mkdir()
    os.link(os.path.join(rank_dir, "model_optim_rng.pt"), bad / "model_optim_rng.pt")
    torch.save({0: {(torch.float32, torch.float32): {"param": [1, 2]}}}, bad / "distrib_optim.pt")
    with pytest.raises(OstateError, match="do not have the layout Megatron writes"):
        ostate.load(bad)
