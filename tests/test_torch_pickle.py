"""ostate's own reader of torch.save files returns what torch.load(weights_only=True, mmap=True) returns.

Refusals of hostile and damaged input are in tests/test_hostile_input.py and tests/test_fuzz_readers.py.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import ostate
from ostate.formats.files import torchfile
from ostate.formats.files.torch_pickle import Unsupported, read_torch_zip
from tests.helpers.common import Net, saved, train


def assert_same(ours, theirs, where="") -> None:
    assert type(ours) is type(theirs), where
    if isinstance(ours, torch.Tensor):
        assert (ours.dtype, ours.shape, ours.stride(), ours.storage_offset(), ours.requires_grad) == (
            theirs.dtype,
            theirs.shape,
            theirs.stride(),
            theirs.storage_offset(),
            theirs.requires_grad,
        ), where
        assert torch.equal(ours, theirs), where
    elif isinstance(ours, dict):
        assert list(ours) == list(theirs), where
        for key in ours:
            assert_same(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs or (ours != ours and theirs != theirs), where  # NaN equals NaN here


def trained() -> tuple[Net, torch.optim.Optimizer]:
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt)
    return model, opt


def everything_torch_save_writes_for_a_checkpoint() -> dict:
    model, opt = trained()
    base = torch.randn(10)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "ordered": OrderedDict(b=torch.arange(3), a=torch.tensor([True, False])),
        "dtypes": [torch.randn(3).to(d) for d in (torch.float16, torch.bfloat16, torch.float64, torch.int8)],
        "complex": torch.randn(2, dtype=torch.complex64),
        "transposed": torch.randn(3, 4).t(),
        "views": (base[2:5], base, base[::3]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(7.0),
        "parameter": torch.nn.Parameter(torch.ones(2)),
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "numbers": [0, -1, 255, 65535, -(2**31), 2**31, 2**70, -(2**70), 1e-300, float("inf"), float("nan")],
        "text": ["", "é→∑", "x" * 300],
        "bytes": b"\x00\xffabc",
        "constants": (None, True, False),
        "nested": {1: {2: [{3: ()}]}},
    }


def test_reads_what_torch_load_reads_with_the_same_strides_offsets_and_shared_storages(tmp_path):
    path = tmp_path / "everything.pt"
    torch.save(everything_torch_save_writes_for_a_checkpoint(), path)
    ours = read_torch_zip(str(path))
    assert_same(ours, torch.load(path, weights_only=True, mmap=True))
    views = ours["views"]
    assert views[0].untyped_storage().data_ptr() == views[1].untyped_storage().data_ptr()


def test_tensors_are_views_of_a_private_mapping_that_never_changes_the_file(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    before = path.read_bytes()
    loaded = read_torch_zip(str(path))
    loaded["w"] += 1
    assert path.read_bytes() == before
    assert read_torch_zip(str(path))["w"].sum() == 0


def test_ostate_load_reads_torch_save_files_without_torch_load(tmp_path, monkeypatch):
    model, opt = trained()
    path = saved(tmp_path, model, opt)
    expected = ostate.analyze(ostate.load(path))

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    import pandas as pd

    pd.testing.assert_frame_equal(ostate.analyze(ostate.load(path)), expected)


def test_what_ostates_reader_refuses_goes_to_torch_s_safe_reader(tmp_path):
    # torch.Size is on torch's allow list but not in what torch.save writes for tensors and containers.
    path = tmp_path / "size.pt"
    torch.save({"shape": torch.Size([2, 3]), "w": torch.ones(2)}, path)
    with pytest.raises(Unsupported, match="torch.Size"):
        read_torch_zip(str(path))
    loaded = torchfile.load_torch_file(str(path))
    assert loaded["shape"] == torch.Size([2, 3]) and loaded["w"].tolist() == [1.0, 1.0]


def test_a_zip_directory_that_zipfile_cannot_read_is_refused_and_left_to_torch(tmp_path):
    # Found by benchmarks/fuzz_readers.py: zipfile raises NotImplementedError for an unknown version.
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(3)}, path)
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")
    data[entry + 6 : entry + 8] = b"\xff\x00"  # "version needed to extract": 25.5
    path.write_bytes(bytes(data))
    with pytest.raises(Unsupported, match="not a readable zip archive"):
        read_torch_zip(str(path))
    assert torchfile.load_torch_file(str(path))["w"].tolist() == [1.0] * 3  # torch ignores that field
