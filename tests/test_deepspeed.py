"""DeepSpeed checkpoints written by DeepSpeed itself (ZeRO 0-3, BF16_Optimizer, universal), read back exactly.

One session fixture runs tests/helpers/deepspeed_train.py: two CPU ranks (gloo) train a tiny
model once per case and save; DeepSpeed's own gather (safe_get_full_optimizer_state,
safe_get_full_fp32_param) is the ground truth. ds_to_universal converts three of them.
The first DeepSpeed start on a machine compiles a small C++ op (about 35 s, cached).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

import ostate
from tests.helpers.common import REPO
from tests.helpers.deepspeed_train import LR, STEPS, TAG, TinyNet, param_groups

# Found, not imported: DeepSpeed runs only in the subprocesses, never inside the test process.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="DeepSpeed is not installed (pip install -c constraints.txt -e '.[dev]')",
    ),
]

ZERO_CASES = ["zero1", "zero2", "zero3", "zero3_subgroups", "bf16", "zero2_elastic"]
UNIVERSAL_CASES = ["zero2", "zero3", "bf16"]
TRAINED = ["embed.weight", "head.weight", "embed.bias", "head.bias"]


@pytest.fixture(scope="session")
def deepspeed_runs(tmp_path_factory):
    # A private folder for the C++ ops DeepSpeed builds on first use (its shared-memory
    # all-reduce on CPU): a build killed half-way elsewhere leaves a lock file in the shared
    # ~/.cache/torch_extensions that would make every later build wait on it forever.
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PYTHONWARNINGS": "ignore",
        "TORCH_EXTENSIONS_DIR": str(tmp_path_factory.mktemp("torch_extensions")),
    }
    # Two processes on a shared machine (a free port taken meanwhile, a C++ op cache being
    # rebuilt by another process) can fail to start; one retry in a fresh folder, then report both.
    failures = []
    for _attempt in range(2):
        out = tmp_path_factory.mktemp("deepspeed")
        done = _run([sys.executable, "-m", "tests.helpers.deepspeed_train", str(out)], env, check=False)
        if done.returncode == 0:
            break
        failures.append(done.stdout[-2000:] + done.stderr[-3000:])
    else:
        pytest.fail("tests/helpers/deepspeed_train.py failed twice:\n" + "\n---\n".join(failures))
    for case in UNIVERSAL_CASES:
        tag_dir = out / case / TAG
        _run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(tag_dir),
                "--output_folder",
                f"{tag_dir}_universal",
                "--inject_missing_state",
            ],
            env,
        )
    return out


def _run(cmd, env, check=True):
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        printed = (e.stdout or b"")[-3000:] + (e.stderr or b"")[-3000:]
        pytest.fail(f"{' '.join(cmd)} ran past {e.timeout} s; it printed:\n" + printed.decode(errors="replace"))
    assert not check or done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def truth(run_dir):
    return torch.load(run_dir / "ground_truth.pt", weights_only=True)


def assert_matches_truth(ckpt, expected):
    o = ckpt.optimizers[0]
    assert sorted(expected) == sorted(TRAINED)
    for name, tensors in expected.items():
        p = o.param(name)
        assert p.shape == tuple(tensors["fp32"].shape)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(p.read(key), tensors[key].float()), (name, key)
        assert torch.equal(ckpt.weights[name].read().float(), tensors["fp32"].float()), name


@pytest.mark.parametrize("case", ZERO_CASES)
def test_partitioned_state_is_rebuilt_exactly_as_deepspeed_gathers_it(deepspeed_runs, case):
    run_dir = deepspeed_runs / case
    ckpt = ostate.load(run_dir)
    assert ckpt.format == "deepspeed" and ckpt.path == str(run_dir / TAG)
    assert_matches_truth(ckpt, truth(run_dir))
    assert {p.name_source for p in ckpt.optimizers[0].params} == {"fqn"}


@pytest.mark.parametrize(
    ("case", "optimizer_class", "step"),
    [
        ("zero0", "torch", STEPS),
        # FP16_UnfusedOptimizer's first step happens inside deepspeed.initialize, with zero gradients.
        ("bf16_zero0", "FP16_UnfusedOptimizer", STEPS + 1),
    ],
)
def test_stage_0_state_is_named_by_model_order_and_equals_the_torch_optimizer(
    deepspeed_runs, case, optimizer_class, step
):
    ckpt = ostate.load(deepspeed_runs / case)
    assert_matches_truth(ckpt, truth(deepspeed_runs / case))
    assert ckpt.metadata["optimizer_class"] == optimizer_class and ckpt.metadata["zero_stage"] == 0
    o = ckpt.optimizers[0]
    assert [(p.name, p.name_source) for p in o.params if p.has_state] == [(n, "model-order") for n in TRAINED]
    assert {p.step for p in o.params if p.has_state} == {float(step)}
    assert o.param("frozen.weight").group == len(o.groups) - 1 and not o.param("frozen.weight").has_state


def test_sub_group_size_really_splits_stage_3_into_several_sub_groups(deepspeed_runs):
    # Otherwise the zero3_subgroups case would test nothing that zero3 does not.
    model_file = deepspeed_runs / "zero3_subgroups" / TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    shapes = torch.load(model_file, weights_only=True)["param_shapes"]
    assert len(shapes) > 2


@pytest.mark.parametrize("case", ["zero1", "zero2", "zero3", "zero3_subgroups", "bf16"])
def test_groups_hyperparameters_steps_and_frozen_parameter_come_from_the_files(deepspeed_runs, case):
    o = ostate.load(deepspeed_runs / case).optimizers[0]
    assert o.kind == "adamw" and o.kind_source == "detected"
    assert [(g["lr"], g["weight_decay"]) for g in o.groups[:2]] == [(LR[0], 0.01), (LR[1], 0.0)]
    assert {p.name: p.group for p in o.params if p.has_state} == {
        "embed.weight": 0,
        "head.weight": 0,
        "embed.bias": 1,
        "head.bias": 1,
    }
    assert {p.step for p in o.params if p.has_state} == {float(STEPS)}
    frozen = o.param("frozen.weight")
    assert not frozen.has_state and frozen.shape == (5, 13) and o.groups[frozen.group] == {"frozen": True}


@pytest.mark.parametrize("case", ["zero2", "zero3", "bf16"])
def test_frozen_weight_and_buffer_are_the_saved_model_values(deepspeed_runs, case):
    torch.manual_seed(0)
    initial = TinyNet()  # the frozen layer never changes from its initial value
    weights = ostate.load(deepspeed_runs / case).weights
    expected = initial.frozen.weight.to(torch.bfloat16).float() if case == "bf16" else initial.frozen.weight
    assert torch.equal(weights["frozen.weight"].read().float(), expected.detach())
    assert torch.equal(weights["scale"].read().float(), initial.scale)


@pytest.mark.parametrize(
    ("case", "stage", "optimizer_class", "bf16"),
    [
        ("zero2", 2, "DeepSpeedZeroOptimizer", False),
        ("zero3", 3, "DeepSpeedZeroOptimizer_Stage3", False),
        ("bf16", 1, "BF16_Optimizer", True),
    ],
)
def test_metadata_records_steps_world_size_stage_and_precision(deepspeed_runs, case, stage, optimizer_class, bf16):
    meta = ostate.load(deepspeed_runs / case).metadata
    assert meta["global_step"] == meta["global_steps"] == STEPS
    assert (meta["dp_world_size"], meta["zero_stage"], meta["optimizer_class"]) == (2, stage, optimizer_class)
    assert meta["bf16"] is bf16 and meta["ds_version"] == importlib.metadata.version("deepspeed") and meta["tag"] == TAG


@pytest.mark.parametrize("case", UNIVERSAL_CASES)
def test_universal_checkpoint_from_ds_to_universal_equals_the_ground_truth(deepspeed_runs, case):
    run_dir = deepspeed_runs / case
    ckpt = ostate.load(run_dir / f"{TAG}_universal")
    assert ckpt.format == "deepspeed-universal" and ckpt.metadata["universal"] is True
    assert_matches_truth(ckpt, truth(run_dir))
    o = ckpt.optimizers[0]
    assert {p.step for p in o.params if p.has_state} == {float(STEPS)}
    assert [(g["lr"], g["weight_decay"]) for g in o.groups[:2]] == [(LR[0], 0.01), (LR[1], 0.0)]
    assert not o.param("frozen.weight").has_state
    # The folder holding both saves reads the one 'latest' names unless told otherwise.
    assert ostate.load(run_dir).format == "deepspeed"
    from ostate.formats.deepspeed import read as deepspeed

    assert deepspeed.read(run_dir, tag=f"{TAG}_universal").format == "deepspeed-universal"


def test_a_universal_checkpoint_of_a_cpu_adam_run_whose_step_is_a_plain_int_is_read(deepspeed_runs, tmp_path):
    # DeepSpeedCPUAdam (ZeRO-Offload) keeps state['step'] as a Python int (deepspeed/ops/adam/cpu_adam.py),
    # and ds_to_universal saves it as is (_save_checkpoint of the value: step.pt holds an int, not a
    # tensor). Running CPUAdam here needs its C++ op built (minutes), so the zero2 run's universal
    # output is given exactly that layout: every step.pt rewritten as the int it holds.
    universal = tmp_path / f"{TAG}_universal"
    shutil.copytree(deepspeed_runs / "zero2" / f"{TAG}_universal", universal)
    steps = sorted(universal.glob("zero/*/step.pt"))
    assert steps
    for step in steps:
        torch.save(int(torch.load(step, weights_only=True)), step)
    ckpt = ostate.load(universal)
    assert_matches_truth(ckpt, truth(deepspeed_runs / "zero2"))
    assert {p.step for p in ckpt.optimizers[0].params if p.has_state} == {float(STEPS)}


def test_a_folder_with_only_latest_universal_reads_the_universal_save(deepspeed_runs, tmp_path):
    # ds_to_universal writes latest_universal beside its output folder, which may be a folder of its own.
    source = deepspeed_runs / "zero3"
    shutil.copytree(source / f"{TAG}_universal", tmp_path / f"{TAG}_universal")
    shutil.copy(source / "latest_universal", tmp_path / "latest_universal")
    ckpt = ostate.load(tmp_path)
    assert ckpt.format == "deepspeed-universal" and ckpt.metadata["tag"] == f"{TAG}_universal"
    assert_matches_truth(ckpt, truth(source))


@pytest.mark.parametrize("case", ["zero2", "zero3", "bf16"])
def test_numbers_equal_those_of_the_same_state_saved_by_plain_torch(deepspeed_runs, case, tmp_path):
    run_dir = deepspeed_runs / case
    expected = truth(run_dir)
    # The same optimizer state, the plain way: a torch AdamW over the same groups, saved with torch.save.
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(param_groups(model), betas=(0.9, 0.999), eps=1e-8)
    named = dict(model.named_parameters())
    for name, tensors in expected.items():
        with torch.no_grad():
            named[name].copy_(tensors["fp32"])
        opt.state[named[name]] = {
            "step": torch.tensor(float(STEPS)),
            "exp_avg": tensors["exp_avg"].float(),
            "exp_avg_sq": tensors["exp_avg_sq"].float(),
        }
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "plain.pt")

    columns = lambda df: df[df["has_state"]].drop(columns=["optimizer", "name_source", "index"]).set_index("name")
    ours = columns(ostate.analyze(ostate.load(run_dir))).sort_index()
    plain = columns(ostate.analyze(ostate.load(tmp_path / "plain.pt"))).sort_index()
    assert list(ours.index) == sorted(TRAINED)
    pd.testing.assert_frame_equal(ours, plain[ours.columns], check_exact=True)
