"""Loading torch.save checkpoints: safely, memory-mapped, wherever the optimizer state sits."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch

import ostate
from ostate import OstateError
from tests.helpers.common import Net, sha256, train


def trained(opt_cls=torch.optim.AdamW, steps=2, **kw):
    torch.manual_seed(0)
    model = Net()
    opt = opt_cls(model.parameters(), **kw)
    train(model, opt, steps=steps)
    return model, opt


def test_finds_optimizers_at_any_depth_and_reports_where(tmp_path):
    model, opt = trained()
    _, opt2 = trained(torch.optim.SGD, lr=0.1, momentum=0.9)
    path = tmp_path / "nested.pt"
    torch.save({"trainer": {"state": {"optim": opt.state_dict()}}, "extras": [1, {"sgd": opt2.state_dict()}]}, path)
    ckpt = ostate.load(path)
    assert [(o.location, o.kind) for o in ckpt.optimizers] == [
        ("trainer.state.optim", "adamw"),
        ("extras[1].sgd", "sgd"),
    ]


def test_bare_optimizer_state_dict_at_the_root(tmp_path):
    _, opt = trained()
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    o = ostate.load(path).optimizers[0]
    assert o.location == "(root)"
    assert [p.name for p in o.params] == [f"param.{i}" for i in range(10)]
    assert {p.name_source for p in o.params} == {"none"}


def test_common_key_names_are_all_found(tmp_path):
    _, opt = trained()
    for key in ("optimizer", "optim", "optimizer_state_dict", "opt"):
        path = tmp_path / f"{key}.pt"
        torch.save({key: opt.state_dict(), "epoch": 3}, path)
        ckpt = ostate.load(path)
        assert ckpt.optimizers[0].location == key
        assert ckpt.metadata["epoch"] == 3


def test_step_counts_groups_and_state_tensors_are_read(tmp_path, adamw_checkpoint):
    path, model, opt = adamw_checkpoint
    o = ostate.load(path).optimizers[0]
    assert [p.step for p in o.params] == [3.0] * 10
    assert o.groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert "params" not in o.groups[0]
    first = next(model.parameters())
    torch.testing.assert_close(o.params[0].read("exp_avg"), opt.state[first]["exp_avg"])
    assert o.params[0].shape == tuple(first.shape)


def test_tensors_are_memory_mapped_not_read_at_load(tmp_path, adamw_checkpoint):
    path, _, _ = adamw_checkpoint
    ckpt = ostate.load(path)
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert str(path) in maps
    assert ckpt.optimizers[0].params[0].state["exp_avg"].nbytes > 0


def test_legacy_non_zip_files_still_load(tmp_path):
    _, opt = trained()
    path = tmp_path / "legacy.pt"
    torch.save({"optimizer": opt.state_dict()}, path, _use_new_zipfile_serialization=False)
    o = ostate.load(path).optimizers[0]
    assert o.kind == "adamw" and o.params[0].step == 2.0


def test_legacy_python_int_steps_are_read_as_numbers(tmp_path):
    _, opt = trained(torch.optim.Adam)
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = 2  # torch < 1.12 saved a Python int
    path = tmp_path / "intstep.pt"
    torch.save(sd, path)
    assert {p.step for p in ostate.load(path).optimizers[0].params} == {2.0}


def test_frozen_parameters_are_listed_without_state(tmp_path):
    model = Net()
    model.inp.weight.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, steps=1)
    path = tmp_path / "frozen.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    o = ostate.load(path).optimizers[0]
    first = o.params[0]
    assert not first.has_state and first.name == "inp.weight" and first.shape == (8, 4)
    assert ostate.describe(o)["params_without_state"] == ["inp.weight"]


def test_param_names_saved_by_torch_are_used(tmp_path):
    model = Net()
    opt = torch.optim.AdamW(model.named_parameters())
    train(model, opt, steps=1)
    path = tmp_path / "named.pt"
    torch.save(opt.state_dict(), path)
    o = ostate.load(path).optimizers[0]
    assert [p.name for p in o.params] == [n for n, _ in model.named_parameters()]
    assert {p.name_source for p in o.params} == {"param_names"}


def test_fqn_keyed_state_from_get_optimizer_state_dict(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, steps=1)
    path = tmp_path / "fqn.pt"
    torch.save({"optim": get_optimizer_state_dict(model, opt)}, path)
    o = ostate.load(path).optimizers[0]
    assert [p.name for p in o.params] == [n for n, _ in model.named_parameters()]
    assert {p.name_source for p in o.params} == {"fqn"}
    assert o.params[0].step == 1.0


class Payload:
    """Pickles into a call of os.mkdir: proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_pickle_that_runs_code_is_refused_and_the_code_never_runs(tmp_path):
    _, opt = trained()
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"optimizer": opt.state_dict(), "x": Payload(str(marker))}, path)
    digest = sha256(path)
    with pytest.raises(OstateError) as e:
        ostate.load(path)
    assert "posix.mkdir" in str(e.value) or "os.mkdir" in str(e.value)
    assert "trust_pickle=True" in str(e.value)
    assert not marker.exists()
    assert sha256(path) == digest


def test_legacy_hostile_pickle_is_refused_and_names_its_globals(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile-legacy.pt"
    torch.save({"x": Payload(str(marker))}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(OstateError) as e:
        ostate.load(path)
    assert "mkdir" in str(e.value)
    assert not marker.exists()


def test_trust_pickle_opts_in_and_warns(tmp_path):
    import argparse

    _, opt = trained()
    path = tmp_path / "args.pt"
    torch.save({"optimizer": opt.state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(OstateError, match="argparse.Namespace"):
        ostate.load(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = ostate.load(path, trust_pickle=True)
    assert ckpt.optimizers[0].kind == "adamw"
    assert any("trust-pickle" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "file is empty"),
        (b"hello, this is text" * 10, "not a torch.save checkpoint"),
        (b"\x80\x02garbage-not-really-a-pickle", "cannot read as a torch checkpoint"),
    ],
)
def test_unreadable_files_get_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(OstateError, match=message):
        ostate.load(path)


def test_truncated_checkpoint_is_reported_as_such(tmp_path, adamw_checkpoint):
    path, _, _ = adamw_checkpoint
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(OstateError) as e:
        ostate.load(cut)
    # In ostate's words (torch's own message is cut mid-sentence): what, where, what to do.
    assert str(e.value) == (
        f"{cut}: cannot read as a torch checkpoint: the zip archive ends early ({len(data) // 2:,} bytes): the "
        "index that torch.save writes last is missing (the file is truncated: an interrupted save, or an "
        "incomplete copy or download; copy or save it again)"
    )


def test_missing_path_and_directory_are_clear_errors(tmp_path):
    with pytest.raises(OstateError, match="no such file"):
        ostate.load(tmp_path / "nope.pt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(OstateError, match="no checkpoint layout recognised.*notes.txt"):
        ostate.load(tmp_path / "d")


def test_no_optimizer_state_names_the_top_level_keys(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": Net().state_dict(), "epoch": 3}, path)
    with pytest.raises(OstateError, match="no optimizer state found.*model, epoch"):
        ostate.load(path)


def test_safetensors_file_is_recognised_and_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(OstateError, match="safetensors file"):
        ostate.load(path)


def test_unknown_state_layout_is_shown_generically_and_suggests_optimizer(tmp_path):
    sd = {"state": {0: {"z": torch.randn(3, 2), "k": torch.tensor(4.0)}}, "param_groups": [{"params": [0], "lr": 0.1}]}
    path = tmp_path / "custom.pt"
    torch.save(sd, path)
    o = ostate.load(path).optimizers[0]
    assert o.kind == "unknown"
    assert any("state keys: k, z" in w and "--optimizer" in w for w in o.warnings)
    row = ostate.analyze(o).iloc[0]
    assert row["z_mean"] == pytest.approx(float(sd["state"][0]["z"].mean()), rel=1e-6)


def test_optimizer_override_is_recorded(tmp_path):
    _, opt = trained()
    path = tmp_path / "o.pt"
    torch.save(opt.state_dict(), path)
    o = ostate.load(path, optimizer="adam").optimizers[0]
    assert (o.kind, o.kind_source) == ("adam", "user")
    with pytest.raises(OstateError, match="unknown optimizer kind"):
        ostate.load(path, optimizer="nonsense")


def test_pickled_payload_helper_really_runs_when_unpickled(tmp_path):
    # Guards the hostile-pickle tests above: the payload does run code when loaded unsafely.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(str(marker))))
    assert marker.exists()


def test_a_file_too_large_for_a_private_mapping_is_mapped_shared(tmp_path, monkeypatch):
    """Linux refuses a private mapping larger than memory + swap (torch: 'unable to mmap ... Cannot
    allocate memory'); the loader then maps the file shared, which is not charged against memory."""
    import mmap as mmap_module

    from ostate.formats.files import torch_pickle, torchfile

    def refused(_fileno):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(torch_pickle, "map_privately", refused)  # ostate's own reader maps privately too
    path = tmp_path / "big.pt"
    torch.save({"state": {}, "param_groups": [{"params": [], "lr": 0.1}], "w": torch.ones(4)}, path)
    real_load = torch.load
    seen = []

    def refusing_private_maps(*args, **kwargs):
        seen.append(torch.serialization.get_default_mmap_options())
        if kwargs.get("mmap") and torch.serialization.get_default_mmap_options() != mmap_module.MAP_SHARED:
            raise RuntimeError(f"unable to mmap 30005353233 bytes from file <{path}>: Cannot allocate memory (12)")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", refusing_private_maps)
    loaded = torchfile.load_torch_file(str(path))
    assert loaded["w"].tolist() == [1.0] * 4
    assert seen[-1] == mmap_module.MAP_SHARED
    assert torch.serialization.get_default_mmap_options() != mmap_module.MAP_SHARED  # restored


def test_public_functions_given_a_path_say_how_to_load_it_or_take_it(tmp_path, adamw_checkpoint):
    from ostate.doctor import diagnose
    from ostate.report import inspect

    path, _, _ = adamw_checkpoint
    with pytest.raises(OstateError, match=r"ostate.analyze takes a loaded checkpoint, not a path \(load it first"):
        ostate.analyze(str(path))
    with pytest.raises(OstateError, match=r"ostate.describe\(ostate.load\(.*\).optimizers\[0\]\)"):
        ostate.describe(path)
    with pytest.raises(OstateError, match="takes a Checkpoint or OptimizerState, not a dict"):
        ostate.analyze({"state": {}})
    # The tools above the reader take a path as well as a loaded checkpoint.
    assert inspect(path).optimizers[0].table.equals(inspect(ostate.load(path)).optimizers[0].table)
    assert diagnose(path).checked == diagnose(ostate.load(path)).checked
