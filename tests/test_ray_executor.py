"""``--executor ray``: Ray tasks analyse disjoint parameters, the driver merges; the output equals the local run.

One local Ray cluster (2 CPUs) serves the whole module; the commands run in this process
(click's runner), so they use it. Each checkpoint is a real one: DCP saved by two gloo
processes with FSDP2, DeepSpeed ZeRO-3 saved by DeepSpeed on two CPU ranks
(tests/fixtures/deepspeed), and a Trainer checkpoint whose model is in sharded safetensors.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

import ostate
from ostate.distributed import RayExecutor, slices, summarize_on_ray
from tests.helpers.common import REPO, run_cli

ZERO3 = REPO / "tests" / "fixtures" / "deepspeed" / "zero3_subgroups"


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def same_output(*args: str) -> str:
    local = run_cli(*args)
    distributed = run_cli(*args, "--executor", "ray")
    assert distributed.returncode == local.returncode, distributed.stderr
    assert distributed.stdout == local.stdout
    return local.stdout


@pytest.mark.slow
def test_dcp_written_by_two_processes_inspects_and_compares_the_same_on_ray(ray_cluster, dcp_sharded):
    path = str(dcp_sharded / "nested")
    report = json.loads(same_output("inspect", path, "--format", "json", "--columns", "all"))
    assert report["statistics"] == ["core", "compressibility", "q8"]
    same_output("compare", path, str(dcp_sharded / "flat"), "--format", "json")


@pytest.mark.slow
def test_deepspeed_zero3_inspects_and_diagnoses_the_same_on_ray(ray_cluster, tmp_path):
    path = tmp_path / "zero3"
    shutil.copytree(ZERO3, path)
    same_output("inspect", str(path), "--format", "json", "--by", "layer", "--compressibility")
    same_output("doctor", str(path), "--format", "json")
    # Cut into more pieces than parameters in a group: the merged sketches are still the local ones.
    checkpoint = ostate.load(path)
    local = ostate.analysis.summarize(checkpoint, workers=1)
    for by in ("param", "model"):
        distributed = summarize_on_ray(checkpoint, RayExecutor(tasks=5)).table(by)
        pd.testing.assert_frame_equal(distributed, local.table(by), check_exact=True)


@pytest.mark.slow
def test_a_trainer_checkpoint_with_sharded_safetensors_plots_the_same_on_ray(ray_cluster, gpt2_run, tmp_path):
    target = tmp_path / "sharded"
    shutil.copytree(gpt2_run.checkpoint, target)
    (target / "model.safetensors").unlink()
    gpt2_run.model.save_pretrained(target, max_shard_size="20KB")
    assert (target / "model.safetensors.index.json").exists()
    report = json.loads(same_output("inspect", str(target), "--format", "json"))
    assert report["optimizers"][0]["params"][1]["update_to_weight_rms"] is not None  # the sharded weights were read
    local, distributed = tmp_path / "local.png", tmp_path / "ray.png"
    assert run_cli("plot", str(target), "-o", str(local), "--kind", "layer-profile").returncode == 0
    result = run_cli("plot", str(target), "-o", str(distributed), "--kind", "layer-profile", "--executor", "ray")
    assert result.returncode == 0, result.stderr
    assert local.read_bytes() == distributed.read_bytes()


def test_address_without_the_ray_executor_is_one_clear_error(tmp_path):
    result = run_cli("inspect", str(tmp_path), "--address", "auto")
    assert result.returncode == 2 and "--address is for --executor ray" in result.stderr


def test_an_in_memory_checkpoint_cannot_go_to_ray():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    with pytest.raises(ostate.OstateError, match="needs a checkpoint on disk"):
        summarize_on_ray(ostate.from_state_dict(opt.state_dict(), model=model), RayExecutor(tasks=1))


def test_parameters_are_cut_into_contiguous_runs_of_about_equal_size():
    assert slices([10, 0, 0, 10, 10, 10], 2) == [(0, 4), (4, 6)]
    runs = slices([1] * 10, 3)
    assert runs[0][0] == 0 and runs[-1][1] == 10 and len(runs) == 3
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
