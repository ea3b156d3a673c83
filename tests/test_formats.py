"""Recognising a checkpoint's layout from its contents, --format-hint, and what an unknown directory gets."""

from __future__ import annotations

import shutil

import pytest
import torch

import ostate
from ostate import OstateError
from ostate.formats import registry
from tests.helpers.common import Net, run_cli, train


@pytest.fixture
def pt_file(tmp_path):
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters())
    train(model, optimizer, steps=1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return path


@pytest.mark.slow
def test_each_layout_is_recognised_from_its_contents(pt_file, accelerate_run, dcp_sharded, tmp_path):
    ostate.convert(pt_file, tmp_path / "opt.safetensors")
    expected = {
        pt_file: "torch",
        tmp_path / "opt.safetensors": "safetensors",
        accelerate_run.directory: "accelerate",
        dcp_sharded / "nested": "dcp",
    }
    for path, name in expected.items():
        assert registry.choose(str(path)).name == name
        assert ostate.load(path).format == name


def test_a_renamed_file_is_still_recognised_by_its_contents(pt_file, tmp_path):
    ostate.convert(pt_file, tmp_path / "opt.safetensors")
    shutil.copy(tmp_path / "opt.safetensors", tmp_path / "weird.bin")
    assert ostate.load(tmp_path / "weird.bin").format == "safetensors"


def test_format_hint_forces_a_reader_and_its_error_is_specific(pt_file):
    with pytest.raises(OstateError, match="is a directory"):
        ostate.load(pt_file.parent, format_hint="torch")
    with pytest.raises(OstateError, match="not a directory"):
        ostate.load(pt_file, format_hint="dcp")
    with pytest.raises(
        OstateError, match="unknown format 'nope'.*hf-trainer, accelerate, megatron, dcp, deepspeed, safetensors, torch"
    ):
        ostate.load(pt_file, format_hint="nope")


def test_cli_format_hint_is_offered_and_checked(pt_file):
    assert run_cli("inspect", str(pt_file), "--format-hint", "torch").returncode == 0
    bad = run_cli("inspect", str(pt_file), "--format-hint", "nope")
    assert bad.returncode == 2 and "hf-trainer" in bad.stderr


def test_an_unknown_directory_lists_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(
        OstateError, match=r"no checkpoint layout recognised.*found: notes.txt, weights.npz.*format_hint=NAME"
    ):
        ostate.load(tmp_path)


@pytest.mark.slow
def test_a_run_folder_points_to_its_checkpoint_subdirectories(gpt2_run):
    with pytest.raises(OstateError, match=r"subdirectories are checkpoints: checkpoint-2, checkpoint-4"):
        ostate.load(gpt2_run.output_dir)


def test_a_deepspeed_folder_goes_to_the_deepspeed_reader(tmp_path):
    # deepspeed/runtime/engine.py save_checkpoint: a `latest` file naming the tag folder global_step<N>/.
    (tmp_path / "latest").write_text("global_step10")
    (tmp_path / "global_step10").mkdir()
    (tmp_path / "global_step10" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert registry.choose(str(tmp_path)).name == "deepspeed"
    assert registry.choose(str(tmp_path / "global_step10")).name == "deepspeed"
    with pytest.raises(OstateError, match="mp_rank_00_model_states.pt: file is empty"):
        ostate.load(tmp_path)


def test_every_reader_is_listed_with_a_summary():
    assert registry.reader_names() == [
        "hf-trainer",
        "accelerate",
        "megatron",
        "dcp",
        "deepspeed",
        "safetensors",
        "torch",
    ]
    assert all(r.summary and callable(r.sniff) and callable(r.read) for r in registry.READERS)


def test_a_scripts_own_folder_of_pt_files_points_to_its_files(pt_file):
    torch.save(torch.load(pt_file, weights_only=True)["optimizer"], pt_file.parent / "optimizer.pt")
    with pytest.raises(OstateError, match=r"to read one file, pass it: ckpt.pt, optimizer.pt"):
        ostate.load(pt_file.parent)
