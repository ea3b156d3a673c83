"""torch.distributed.checkpoint directories written by torch itself (tests/helpers/builders.py), read without a process group."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import ostate
from ostate import OstateError
from ostate.formats.dcp import read as dcp_reader
from ostate.formats.dcp.metadata import read_metadata
from tests.helpers.builders import Mlp, assert_same_state, mlp_optimizer, save_dcp_layouts
from tests.helpers.common import sha256

LAYOUTS = ["nested", "flat", os.path.join("torchtitan", "step-3")]


@pytest.fixture(scope="module")
def dcp_single(tmp_path_factory):
    """The same layouts saved by a gloo process group of one (no sharding)."""
    directory = tmp_path_factory.mktemp("dcp1")
    save_dcp_layouts(directory, world_size=1)
    return directory


@pytest.fixture
def no_pg_checkpoint(tmp_path):
    """Saved in this process with no process group at all (dcp.save(..., no_dist=True))."""
    torch.manual_seed(0)
    model = Mlp()
    optimizer = mlp_optimizer(model)
    for _ in range(2):
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    state = get_optimizer_state_dict(model, optimizer)
    dcp.save(
        {"model": get_model_state_dict(model), "optimizer": state}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True
    )
    return tmp_path / "ckpt", model, optimizer, state


def oracle(directory):
    return torch.load(directory / "oracle.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_tensors_are_reassembled_equal_to_torchs_full_state(dcp_sharded, layout):
    ckpt = ostate.load(dcp_sharded / layout)
    (o,) = ckpt.optimizers
    assert ckpt.format == "dcp" and o.kind == "adamw"
    full = oracle(dcp_sharded)["optimizer"]
    assert_same_state(o, full["state"])
    assert [p.name for p in o.params] == [n for g in full["param_groups"] for n in g["params"]]
    assert {p.name_source for p in o.params} == {"fqn"}


@pytest.mark.slow
def test_the_sharded_checkpoint_really_is_in_chunks_across_ranks(dcp_sharded):
    metadata = FileSystemReader(str(dcp_sharded / "nested")).read_metadata()
    chunks = metadata.state_dict_metadata["optimizer.state.blocks.0.weight.exp_avg"].chunks
    assert len(chunks) == 2 and {tuple(c.offsets) for c in chunks} == {(0, 0), (3, 0)}
    files = {metadata.storage_data[i].relative_path for i in metadata.storage_data}
    assert files == {"__0_0.distcp", "__1_0.distcp"}


@pytest.mark.slow
def test_rows_of_a_tensor_saved_in_chunks_are_its_rows(dcp_sharded):
    # two ranks' chunks, three rows each: each row is read from the chunk that holds it
    storage = dcp_reader.Storage(str(dcp_sharded / "nested"), read_metadata(str(dcp_sharded / "nested" / ".metadata")))
    key = "optimizer.state.blocks.0.weight.exp_avg"
    rows = storage.rows(key, storage.entries[key])
    full = oracle(dcp_sharded)["optimizer"]["state"]["blocks.0.weight"]["exp_avg"]
    assert len(rows) == full.shape[0] == 6 and all(r.shape == tuple(full.shape[1:]) for r in rows)
    assert all(torch.equal(r.read(), full[i]) for i, r in enumerate(rows))


def test_rows_of_a_tensor_in_one_chunk_are_its_rows(tmp_path):
    whole = torch.arange(24.0).reshape(4, 6)
    dcp.save({"t": whole}, checkpoint_id=str(tmp_path), no_dist=True)
    storage = dcp_reader.Storage(str(tmp_path), read_metadata(str(tmp_path / ".metadata")))
    rows = storage.rows("t", storage.entries["t"])
    assert [r.shape for r in rows] == [(6,)] * 4
    assert all(torch.equal(r.read(), whole[i]) for i, r in enumerate(rows))


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_gloo_group_of_one_reads_the_same_way(dcp_single, layout):
    (o,) = ostate.load(dcp_single / layout).optimizers
    assert_same_state(o, oracle(dcp_single)["optimizer"]["state"])


def test_without_any_process_group_state_and_groups_match_the_optimizer(no_pg_checkpoint):
    path, model, optimizer, state = no_pg_checkpoint
    ckpt = ostate.load(path)
    (o,) = ckpt.optimizers
    assert_same_state(o, state["state"])
    assert [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]] == o.groups
    assert [p.group for p in o.params] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ckpt.weights_location == "model" and torch.equal(ckpt.weights["head.weight"].read(), model.head.weight)


def test_statistics_equal_those_of_the_plain_load(no_pg_checkpoint):
    path, model, _, state = no_pg_checkpoint
    ours = ostate.analyze(ostate.load(path)).set_index("name")
    reference = ostate.analyze(ostate.from_state_dict(state, model=model)).set_index("name")
    numeric = [c for c in reference.columns if reference[c].dtype.kind == "f"]
    assert (ours.loc[reference.index, numeric].fillna(-1) == reference[numeric].fillna(-1)).all().all()


@pytest.mark.slow
def test_flattened_form_rebuilds_groups_and_says_so(dcp_sharded):
    (o,) = ostate.load(dcp_sharded / "flat").optimizers
    assert [g["weight_decay"] for g in o.groups] == [0.1, 0.0]
    assert {p.name for p in o.params if p.group == 1} == {"embed.bias", "blocks.0.bias", "blocks.1.bias", "head.bias"}
    assert any("not its param group" in w for w in o.warnings)


@pytest.mark.slow
def test_torchtitan_layout_finds_model_at_top_level_step_and_scheduler(dcp_sharded):
    ckpt = ostate.load(dcp_sharded / "torchtitan" / "step-3")
    assert ckpt.metadata["step"] == 3
    assert ckpt.weights_location == "(top level)" and "head.weight" in ckpt.weights
    (scheduler,) = ckpt.schedulers
    assert scheduler["_last_lr"] == oracle(dcp_sharded)["lr"]


@pytest.mark.slow
def test_only_the_needed_byte_ranges_are_read(dcp_sharded, monkeypatch):
    reads = []
    real = dcp_reader.load_torch_stream

    def counting(stream, *, where, trust_pickle=False, warn=True):
        reads.append(where)
        return real(stream, where=where, trust_pickle=trust_pickle, warn=warn)

    monkeypatch.setattr(dcp_reader, "load_torch_stream", counting)
    o = ostate.load(dcp_sharded / "nested").optimizers[0]
    # At load: the entries of the two param groups (11 hyperparameters, the scheduler's initial_lr and
    # params each) and the 8 parameters' 0-d step counts; never a moment or a weight.
    assert len(reads) == 2 * 13 + 8
    reads.clear()
    o.param("blocks.1.weight").read("exp_avg")
    assert len(reads) == 2 and {w.split("__")[1][:1] for w in reads} == {"0", "1"}  # one chunk from each rank


def test_metadata_is_read_with_dcps_own_classes_only(no_pg_checkpoint):
    path = no_pg_checkpoint[0]
    ours = read_metadata(str(path / ".metadata"))
    torchs = FileSystemReader(str(path)).read_metadata()
    assert ours.planner_data == torchs.planner_data
    assert {k: type(v).__name__ for k, v in ours.state_dict_metadata.items()} == {
        k: type(v).__name__ for k, v in torchs.state_dict_metadata.items()
    }


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_hostile_metadata_file_is_refused_and_never_runs(no_pg_checkpoint, tmp_path):
    path = tmp_path / "hostile"
    shutil.copytree(no_pg_checkpoint[0], path)
    marker = tmp_path / "code-ran"
    metadata = read_metadata(str(path / ".metadata"))
    metadata.planner_data = {"x": Payload(str(marker))}
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    digest = sha256(path / ".metadata")
    with pytest.raises(OstateError, match=r"mkdir.*trust_pickle=True"):
        ostate.load(path)
    assert not marker.exists() and sha256(path / ".metadata") == digest


def test_a_missing_rank_file_is_one_clear_error(no_pg_checkpoint, tmp_path):
    path = tmp_path / "broken"
    shutil.copytree(no_pg_checkpoint[0], path)
    (path / "__0_0.distcp").unlink()
    with pytest.raises(OstateError, match="missing or unreadable"):
        ostate.load(path)


def test_truncated_metadata_is_reported_as_such(no_pg_checkpoint, tmp_path):
    path = tmp_path / "cut"
    shutil.copytree(no_pg_checkpoint[0], path)
    data = (path / ".metadata").read_bytes()
    (path / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(OstateError, match="truncated or corrupted"):
        ostate.load(path)


def test_a_dcp_checkpoint_without_optimizer_lists_what_it_holds(tmp_path):
    dcp.save({"model": Mlp().state_dict()}, checkpoint_id=str(tmp_path / "weights"), no_dist=True)
    with pytest.raises(OstateError, match="no optimizer state found.*model"):
        ostate.load(tmp_path / "weights")


def test_a_raw_state_dict_saved_with_dcp_keeps_its_index_keys(tmp_path):
    # DCP turns a raw optimizer.state_dict()'s int state keys into path strings ('0'); params stay ints.
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    dcp.save(
        {"model": model.state_dict(), "optim": optimizer.state_dict()},
        checkpoint_id=str(tmp_path / "raw"),
        no_dist=True,
    )
    (o,) = ostate.load(tmp_path / "raw").optimizers
    assert [(p.name, p.name_source) for p in o.params] == [("weight", "model-order"), ("bias", "model-order")]
    assert torch.equal(o.param("weight").read("momentum_buffer"), optimizer.state[model.weight]["momentum_buffer"])


def test_an_optimizer_that_never_stepped_has_groups_and_no_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    dcp.save(
        {"optimizer": torch.optim.AdamW(model.parameters(), lr=0.5).state_dict()},
        checkpoint_id=str(tmp_path / "fresh"),
        no_dist=True,
    )
    (o,) = ostate.load(tmp_path / "fresh").optimizers
    assert o.groups[0]["lr"] == 0.5 and len(o.params) == 2 and not any(p.has_state for p in o.params)
