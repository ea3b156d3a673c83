"""Megatron distributed-optimizer checkpoints, read without Megatron.

The older layout (``distrib_optim.pt`` + ``model_optim_rng.pt``): megatron-core's distributed
optimizer and its grad buffers need CUDA, so these files are written by
tests/helpers/megatron_ckpt.py, which reproduces megatron-core 0.16.1's layout from its source
(see that module); the optimizer state in them is the real torch AdamW's.

The ``torch_dist`` layout is written by megatron-core's real ``dist_checkpointing.save`` on CPU.
"""

from __future__ import annotations

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
from ostate.formats.megatron import buckets
from ostate.formats.megatron import read as megatron
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
    model, opt = megatron_ckpt.trained(3)
    stacked: dict[str, dict[str, list]] = {}
    for name, p in model.named_parameters():
        key, _ = megatron_ckpt.sharded_key(name)
        for k, t in {"param": p.detach(), **{k: opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")}}.items():
            stacked.setdefault(key, {}).setdefault(k, []).append(t)
    truth = {
        key: {k: torch.stack(ts) if ".layers." in key else ts[0] for k, ts in entry.items()}
        for key, entry in stacked.items()
    }
    return out, truth, opt


@pytest.mark.slow
def test_torch_dist_checkpoint_by_megatron_reads_every_sharded_key_exactly(torch_dist):
    out, truth, _ = torch_dist
    assert registry.choose(str(out)).name == "megatron" and registry.choose(str(out.parent)).name == "megatron"
    ckpt = ostate.load(out.parent)
    assert ckpt.metadata["megatron_format"] == "torch_dist" and ckpt.metadata["global_step"] == 3
    o = ckpt.optimizers[0]
    assert sorted(p.name for p in o.params) == sorted(truth) and o.kind == "adamw"
    for key, tensors in truth.items():
        p = o.param(key)
        assert p.step == 3.0 and p.shape == tuple(tensors["param"].shape)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(p.read(k), tensors[k]), (key, k)
        assert torch.equal(ckpt.weights[key].read(), tensors["param"])
    groups = {p.name: o.groups[p.group]["weight_decay"] for p in o.params}
    assert groups["decoder.layers.input_layernorm.weight"] == 0.0  # 1-D per layer, stacked to 2-D
    assert groups["decoder.layers.mlp.linear_fc1.weight"] == 0.1


@pytest.mark.slow
def test_torch_dist_analysis_matches_the_real_tensors_and_damage_is_one_line(torch_dist, tmp_path):
    out, truth, opt = torch_dist
    ours = ostate.analyze(ostate.load(out)).set_index("name")
    groups = [dict(g, params=[]) for g in opt.state_dict()["param_groups"]]
    o = ostate.load(out).optimizers[0]
    state = {}
    for p in o.params:
        groups[p.group]["params"].append(p.name)
        state[p.name] = {"step": torch.tensor(3.0), **{k: truth[p.name][k] for k in ("exp_avg", "exp_avg_sq")}}
    plain = tmp_path / "plain.pt"
    torch.save(
        {"model": {k: v["param"] for k, v in truth.items()}, "optimizer": {"state": state, "param_groups": groups}},
        plain,
    )
    expected = ostate.analyze(ostate.load(plain)).set_index("name")
    numeric = [
        c for c in expected.columns if pd.api.types.is_numeric_dtype(expected[c]) and c not in ("index", "group")
    ]
    pd.testing.assert_frame_equal(ours.loc[expected.index, numeric], expected[numeric], check_exact=False, rtol=1e-6)

    broken = shutil.copytree(out, tmp_path / "broken")
    (broken / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    data = sorted(broken.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:100])
    result = run_cli("inspect", str(broken))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_a_distrib_optim_file_of_another_shape_is_one_clear_error(saved, tmp_path):
    _, _, rank_dir = saved
    bad = tmp_path / "mp_rank_00"
    bad.mkdir()
    os.link(os.path.join(rank_dir, "model_optim_rng.pt"), bad / "model_optim_rng.pt")
    torch.save({0: {(torch.float32, torch.float32): {"param": [1, 2]}}}, bad / "distrib_optim.pt")
    with pytest.raises(OstateError, match="do not have the layout Megatron writes"):
        ostate.load(bad)
