"""File names a checkpoint's own metadata supplies never lead outside the checkpoint's folder.

Each hostile checkpoint names a file outside its folder that really exists and holds
valid data of the right kind (a copy of the checkpoint's own file), so without the
check the command would succeed and show (or write) what lies outside: the tests fail
then. Symlinks that are part of the folder (the Hugging Face cache's
``snapshots/<rev>/file -> ../../blobs/<hash>``) keep working.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ostate.formats.files.members import OutsideCheckpointError, member_path, unsafe_reason
from tests.helpers.common import REPO, Net, run_cli, train

DEEPSPEED = REPO / "tests" / "fixtures" / "deepspeed" / "fusedadam"


def assert_refused(result, *fragments: str) -> None:
    """Exit 2, one line on stderr, no traceback, naming each fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("ostate: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _trained() -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt, steps=2)
    return model, opt


# ---------------------------------------------------------------- the rule itself
@pytest.mark.parametrize(
    "name",
    [
        "../x.distcp",
        "a/../../x",
        "..",
        "/etc/passwd",
        "\\\\server\\share\\x",
        "C:\\x.bin",
        "c:x.bin",
        "a\x00b",
        "",
        ".",
        "./",
        3,
    ],
)
def test_names_leaving_the_folder_are_refused_with_the_entry_named(name):
    assert unsafe_reason(name) is not None
    with pytest.raises(OutsideCheckpointError, match="entry 'w' names the file"):
        member_path("ckpt", name, listed_in="ckpt/.metadata", entry="w")


@pytest.mark.parametrize("name", ["__0_0.distcp", "shards/model-00001.bin", "./a.bin", "a..b.bin", "..hidden", "..."])
def test_relative_names_inside_the_folder_are_joined(name):
    assert member_path("ckpt", name, listed_in="i", entry="w") == os.path.join("ckpt", name)


# ---------------------------------------------------------------- DCP
def _dcp(tmp_path: Path) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, opt = _trained()
    path = tmp_path / "ckpt"
    dcp.save(
        {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
        checkpoint_id=str(path),
        no_dist=True,
    )
    return path


def _point_dcp_outside(path: Path, outside: Path, *, absolute: bool) -> None:
    """Move the data file out of the folder and make ``.metadata`` name it there."""
    (data,) = path.glob("*.distcp")
    shutil.move(data, outside)
    metadata = pickle.loads((path / ".metadata").read_bytes())
    name = str(outside) if absolute else os.path.relpath(outside, path)
    for info in metadata.storage_data.values():
        info.relative_path = name
    (path / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("absolute", [False, True], ids=["dotdot", "absolute"])
def test_a_dcp_metadata_naming_a_file_outside_is_refused_by_inspect_and_reset(tmp_path, absolute):
    path = _dcp(tmp_path)
    outside = tmp_path / "outside.distcp"
    _point_dcp_outside(path, outside, absolute=absolute)
    name = str(outside) if absolute else "../outside.distcp"

    assert_refused(run_cli("inspect", str(path)), ".metadata", f"names the file '{name}'", "outside the checkpoint")
    out = tmp_path / "reset"
    assert_refused(run_cli("reset", str(path), "--strategy", "reset-m", "-o", str(out)), "outside the checkpoint")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "outside.distcp"]


# ---------------------------------------------------------------- Hugging Face shard index
def _sharded_folder(folder: Path, shard_names: list[str]) -> tuple[Net, list[Path]]:
    """A Trainer-style folder: optimizer.pt, trainer_state.json and a pytorch_model.bin.index.json."""
    model, opt = _trained()
    folder.mkdir(parents=True)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    state = model.state_dict()
    keys = list(state)
    half = len(keys) // 2
    parts = [dict((k, state[k]) for k in keys[:half]), dict((k, state[k]) for k in keys[half:])]
    weight_map = {k: shard_names[0] for k in keys[:half]} | {k: shard_names[1] for k in keys[half:]}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shards = []
    for part, name in zip(parts, shard_names):
        shard = Path(os.path.normpath(folder / name)) if not os.path.isabs(name) else Path(name)
        torch.save(part, shard)
        shards.append(shard)
    return model, shards


def test_a_shard_index_naming_a_file_outside_is_refused_not_a_warning(tmp_path):
    _sharded_folder(tmp_path / "ckpt", ["pytorch_model-00001-of-00002.bin", "../outside.bin"])
    result = run_cli("inspect", str(tmp_path / "ckpt"))
    assert_refused(result, "pytorch_model.bin.index.json", "names the file '../outside.bin'", "outside the checkpoint")

    absolute = tmp_path / "abs"
    _sharded_folder(absolute, ["pytorch_model-00001-of-00002.bin", str(tmp_path / "elsewhere.bin")])
    assert_refused(run_cli("inspect", str(absolute)), "an absolute path")
    # doctor --model reads a model folder through the same index
    assert_refused(run_cli("doctor", str(tmp_path / "ckpt" / "optimizer.pt"), "--model", str(absolute)), "outside")


def test_a_hugging_face_cache_snapshot_with_symlinked_shards_still_reads(tmp_path):
    """The cache keeps files in blobs/ and links snapshots/<rev>/<name> to ../../blobs/<hash>."""
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    snapshot = tmp_path / "models--tiny" / "snapshots" / "abc123"
    _, shards = _sharded_folder(snapshot, names)
    blobs = tmp_path / "models--tiny" / "blobs"
    blobs.mkdir()
    for i, shard in enumerate(shards):
        blob = blobs / f"{i:064x}"
        shutil.move(shard, blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), shard)
    assert os.readlink(shards[0]).startswith("../../blobs/")

    result = run_cli("inspect", str(snapshot), "--by", "param", "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert "model-order" in result.stdout and "hidden.weight" in result.stdout
    doctor = run_cli("doctor", str(snapshot / "optimizer.pt"), "--model", str(snapshot))
    assert doctor.returncode in (0, 3) and not doctor.stderr, doctor.stderr  # 3: its findings, not an error


# ---------------------------------------------------------------- DeepSpeed's latest
def test_a_deepspeed_latest_naming_a_folder_outside_is_refused_by_inspect_and_reset(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(DEEPSPEED, run)
    (run / "ground_truth.pt").unlink()
    shutil.move(run / "global_step3", tmp_path / "elsewhere")
    (run / "latest").write_text("../elsewhere")

    assert_refused(run_cli("inspect", str(run)), "latest", "names the file '../elsewhere'")
    out = tmp_path / "out"
    assert_refused(run_cli("reset", str(run), "--strategy", "reset-m", "-o", str(out)), "outside the checkpoint")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "run"]
