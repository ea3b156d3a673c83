"""DeepSpeed checkpoints read without DeepSpeed: committed real saves, damaged copies, hostile files.

tests/fixtures/deepspeed/ holds two small checkpoints written by DeepSpeed 0.19.8 on CPU
with two ranks (``python -m tests.helpers.deepspeed_train tests/fixtures/deepspeed --fixtures
fusedadam zero3_subgroups``), each with DeepSpeed's own gathered ground_truth.pt:
ZeRO-2 with DeepSpeed's FusedAdam (a Python int step), and ZeRO-3 split into sub-groups.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import ostate
from ostate import OstateError
from ostate.formats.deepspeed import read as deepspeed
from ostate.formats.deepspeed.files import DEEPSPEED_GLOBALS, tag_files
from ostate.formats.deepspeed.zero import stage_1_2_params
from tests.helpers.common import REPO, run_cli

FIXTURES = REPO / "tests" / "fixtures" / "deepspeed"
ZERO2 = FIXTURES / "fusedadam"
ZERO3 = FIXTURES / "zero3_subgroups"
TAG = "global_step3"


def copy_of(fixture, tmp_path):
    return shutil.copytree(fixture, tmp_path / fixture.name)


def rewrite(path, change):
    obj = torch.load(path, weights_only=True)
    change(obj)
    torch.save(obj, path)


@pytest.mark.parametrize("fixture", [ZERO2, ZERO3], ids=["zero2-fusedadam", "zero3-subgroups"])
def test_committed_deepspeed_saves_read_exactly_without_deepspeed(fixture):
    ckpt = ostate.load(fixture)
    truth = torch.load(fixture / "ground_truth.pt", weights_only=True)
    o = ckpt.optimizers[0]
    for name, tensors in truth.items():
        p = o.param(name)
        assert p.name_source == "fqn" and p.step == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(p.read(key), tensors[key])
        assert torch.equal(ckpt.weights[name].read(), tensors["fp32"])


@pytest.mark.parametrize("fixture", [ZERO2, ZERO3], ids=["zero2-fusedadam", "zero3-subgroups"])
def test_frozen_parameters_are_marked_frozen_and_so_is_only_their_group(fixture):
    o = ostate.load(fixture).optimizers[0]
    assert [p.name for p in o.params if p.frozen] == ["frozen.weight"]
    last = len(o.groups) - 1
    assert o.param("frozen.weight").group == last and not o.param("frozen.weight").has_state
    assert [o.is_frozen_group(g) for g in range(len(o.groups))] == [g == last for g in range(len(o.groups))]
    assert [g["frozen"] for g in ostate.describe(o)["groups"]] == [g == last for g in range(len(o.groups))]


def test_fusedadam_keeps_an_int_step_and_its_kind_comes_from_the_deepspeed_config():
    o = ostate.load(ZERO2).optimizers[0]
    # FusedAdam's groups carry no decoupled_weight_decay: the config's "type": "AdamW" decides.
    assert (o.kind, o.kind_source) == ("adamw", "ds_config")
    assert o.param("embed.weight").state["step"] == 3 and isinstance(o.param("embed.weight").state["step"], int)
    assert not any("fit adam" in w for w in o.warnings)


def test_user_choice_of_optimizer_family_wins_over_the_config():
    o = ostate.load(ZERO2, optimizer="adam").optimizers[0]
    assert (o.kind, o.kind_source) == ("adam", "user")


def test_reading_needs_no_deepspeed_module(tmp_path):
    # deepspeed set to None in sys.modules makes any import of it fail.
    code = (
        "import sys; sys.modules['deepspeed'] = None; import ostate; "
        f"c = ostate.load({str(ZERO3)!r}); print(len(c.optimizers[0].params))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "5"


def test_tag_folder_and_save_folder_read_the_same_and_another_tag_can_be_chosen(tmp_path):
    assert ostate.load(ZERO3 / TAG).path == ostate.load(ZERO3).path == str(ZERO3 / TAG)
    run = copy_of(ZERO3, tmp_path)
    shutil.copytree(run / TAG, run / "global_step1")
    (run / "latest").write_text("global_step1")
    assert ostate.load(run).metadata["tag"] == "global_step1"
    assert deepspeed.read(run, tag=TAG).metadata["tag"] == TAG


def test_only_the_four_deepspeed_classes_are_allowed_to_unpickle():
    assert sorted(name for _cls, name in DEEPSPEED_GLOBALS) == [
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    ]


class Hostile:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_rank_file_with_any_other_pickled_global_is_refused_without_running_it(tmp_path):
    run = copy_of(ZERO2, tmp_path)
    marker = tmp_path / "code-ran"
    victim = run / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": Hostile(str(marker))}}, victim)
    with pytest.raises(OstateError, match="makedirs") as err:
        ostate.load(run)
    assert "trust_pickle=True" in str(err.value) and str(victim) in str(err.value)
    assert not marker.exists()


def test_missing_rank_file_is_an_error_that_says_which(tmp_path):
    run = copy_of(ZERO2, tmp_path)
    (run / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(OstateError, match="saved by 2 data-parallel ranks but 1 optimizer files"):
        ostate.load(run)
    (run / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt").rename(
        run / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    )
    with pytest.raises(OstateError, match="rank 0 are missing"):
        ostate.load(run)


def test_latest_naming_a_missing_tag_is_an_error_listing_the_tags_there(tmp_path):
    run = copy_of(ZERO2, tmp_path)
    (run / "latest").write_text("global_step99\n")
    with pytest.raises(OstateError, match=r"'latest' names the tag 'global_step99'.*global_step3"):
        ostate.load(run)


def test_several_tags_without_latest_need_a_choice(tmp_path):
    run = copy_of(ZERO2, tmp_path)
    (run / "latest").unlink()
    shutil.copytree(run / TAG, run / "global_step6")
    with pytest.raises(OstateError, match="no 'latest' file.*global_step3, global_step6"):
        ostate.load(run)


def test_rank_files_of_a_different_world_size_are_refused(tmp_path):
    run = copy_of(ZERO2, tmp_path)
    tag = run / TAG
    shutil.copy(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt", tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    rewrite(tag / "mp_rank_00_model_states.pt", lambda ms: ms.update(dp_world_size=3))
    with pytest.raises(OstateError, match="written with 2 ranks, but 3 rank files"):
        ostate.load(run)


@pytest.mark.parametrize(
    ("fixture", "model_file"),
    [
        (ZERO2, "mp_rank_00_model_states.pt"),
        (ZERO3, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
    ],
)
def test_param_shapes_that_do_not_fit_the_partitions_are_refused(tmp_path, fixture, model_file):
    run = copy_of(fixture, tmp_path)
    rewrite(run / TAG / model_file, lambda ms: ms["param_shapes"][0].update({"embed.weight": torch.Size([13, 70])}))
    with pytest.raises(OstateError, match="param_shapes do not fit"):
        ostate.load(run)


@pytest.mark.parametrize(
    ("extra_file", "what"),
    [
        ("mp_rank_01_model_states.pt", "tensor-parallel"),
        ("layer_03_expert_1_mp_rank_00_model_states.pt", "mixture-of-experts"),
        ("expp_rank_0_mp_rank_00_optim_states.pt", "mixture-of-experts"),
    ],
)
def test_unsupported_parallel_layouts_are_refused_with_what_to_do(tmp_path, extra_file, what):
    # File names as DeepSpeed's runtime/engine.py writes them for tensor parallelism and experts.
    run = copy_of(ZERO2, tmp_path)
    shutil.copy(run / TAG / "mp_rank_00_model_states.pt", run / TAG / extra_file)
    with pytest.raises(OstateError, match=f"{what}.*ds_to_universal"):
        ostate.load(run)


def test_cli_inspects_a_deepspeed_folder_and_reports_bad_ones_in_one_line(tmp_path):
    result = run_cli("inspect", str(ZERO3))
    assert result.returncode == 0
    assert "(deepspeed)" in result.stdout and "frozen (not in the optimizer)" in result.stdout
    assert "embed.weight" in result.stdout and "global_step=3" in result.stdout
    run = copy_of(ZERO3, tmp_path)
    (run / "latest").write_text("global_step99")
    result = run_cli("inspect", str(run))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_sniff_recognises_save_and_tag_folders_only(tmp_path):
    assert deepspeed.is_deepspeed_folder(ZERO2) and deepspeed.is_deepspeed_folder(ZERO2 / TAG)
    assert not deepspeed.is_deepspeed_folder(tmp_path) and not deepspeed.is_deepspeed_folder(
        ZERO2 / TAG / "mp_rank_00_model_states.pt"
    )


def test_alignment_padding_between_parameters_is_skipped():
    """Stage 1/2 layout with ``param_alignment_paddings``, built as DeepSpeed 0.19.8 does it.

    runtime/zero/stage_1_and_2.py: each parameter but the last is followed by
    ``(-offset) % param_alignment`` zeros, the flat group is padded at its tail to a
    multiple of 2*W and cut into W equal partitions (one per rank); state_dict() saves
    ``param_alignment_paddings`` and each rank's partition.
    """
    shapes = {"a": (5,), "b": (2, 3)}
    values = {"a": torch.arange(1.0, 6.0), "b": torch.arange(10.0, 16.0)}
    paddings = [3, 0]  # a: 5 values, padded to the alignment of 8; b is last
    flat = torch.cat([values["a"], torch.zeros(3), values["b"]])
    world = 2
    flat = torch.cat([flat, torch.zeros(-flat.numel() % (2 * world))])
    pieces = flat.chunk(world)
    shards = [
        {
            "base_optimizer_state": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": 2 * piece}}},
            "single_partition_of_fp32_groups": [piece],
            "param_alignment_paddings": [paddings],
        }
        for piece in pieces
    ]
    params = stage_1_2_params([shapes], shards, "test")
    for p in params:
        assert p.shape == shapes[p.name]
        assert torch.equal(p.fp32.read(), values[p.name].view(p.shape))
        assert torch.equal(p.state["exp_avg"].read(), 2 * values[p.name].view(p.shape))


def test_rank_files_are_ordered_by_rank_number_not_by_name(tmp_path):
    # DeepSpeed does not zero-pad the data-parallel rank: zero_pp_rank_10 sorts before zero_pp_rank_2 by name.
    for rank in range(12):
        (tmp_path / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    (tmp_path / "mp_rank_00_model_states.pt").touch()
    files = tag_files(str(tmp_path))
    assert [os.path.basename(f) for f in files.optim_files][:3] == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
    ]
    assert files.optim_files[-1].endswith("bf16_zero_pp_rank_11_mp_rank_00_optim_states.pt") and files.bf16


def test_a_trainer_checkpoint_saved_under_deepspeed_shows_the_trainers_step_and_schedule(tmp_path):
    # transformers' Trainer with DeepSpeed writes checkpoint-N/ with trainer_state.json and scheduler.pt
    # beside DeepSpeed's `latest` and global_step<N>/ (trainer.py::_save_checkpoint; no optimizer.pt).
    import json

    folder = copy_of(ZERO2, tmp_path)
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": 3, "epoch": 1.5, "log_history": [{"learning_rate": 2e-4, "step": 3}]})
    )
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(), sched.step()
    torch.save(sched.state_dict(), folder / "scheduler.pt")
    ckpt = ostate.load(folder)
    assert ckpt.format == "deepspeed"
    assert ckpt.metadata["epoch"] == 1.5 and ckpt.metadata["logged_lr"] == 2e-4
    assert ckpt.schedulers and ckpt.schedulers[0]["_last_lr"] == [5e-4]
    assert {p.name_source for p in ckpt.optimizers[0].params} == {"fqn"}
