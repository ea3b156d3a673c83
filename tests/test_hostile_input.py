"""Hostile and broken input (issue 9): every case ends in one clear error (exit 2, no traceback) or a correct result.

Hostile pickles carry a real ``__reduce__`` payload that would create a marker
directory; huge-tensor claims are crafted into real file layouts and read in a child
process under an address-space limit, so that a regression that allocates fails
instead of eating the machine. Inputs are hashed before and after.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import ostate
from tests.helpers import specimens
from tests.helpers.common import REPO, Net, run_cli, sha256, train


class Payload:
    """Pickles into a call of os.mkdir: proof that code ran."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def assert_clear_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("ostate: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def hashes(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): sha256(p) for p in files}


@pytest.fixture(scope="module")
def specimen_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("specimens")


@pytest.fixture(scope="module")
def all_specimens(specimen_dir):
    return {name: specimens.build(name, specimen_dir / name) for name in specimens.BUILDERS}


# ---------------------------------------------------------------- pickles that run code
def _hostile_torch_zip(directory: Path, marker: Path) -> Path:
    path = directory / "hostile.pt"
    _, opt = _trained()
    torch.save({"optimizer": opt.state_dict(), "x": Payload(str(marker))}, path)
    return path


def _hostile_torch_legacy(directory: Path, marker: Path) -> Path:
    path = directory / "hostile-legacy.pt"
    _, opt = _trained()
    torch.save({"optimizer": opt.state_dict(), "x": Payload(str(marker))}, path, _use_new_zipfile_serialization=False)
    return path


def _hostile_dcp_metadata(directory: Path, marker: Path) -> Path:
    spec = specimens.dcp(directory)
    with open(spec.path / ".metadata", "wb") as f:  # torch writes it with pickle.dump; so does an attacker
        pickle.dump(Payload(str(marker)), f)
    return spec.path


def _hostile_trainer_optimizer(directory: Path, marker: Path) -> Path:
    folder = directory / "checkpoint-2"
    folder.mkdir()
    _, opt = _trained()
    torch.save({**opt.state_dict(), "x": Payload(str(marker))}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    return folder


def _trained():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt, steps=1)
    return model, opt


HOSTILE = {
    "torch-zip": _hostile_torch_zip,
    "torch-legacy": _hostile_torch_legacy,
    "dcp-metadata": _hostile_dcp_metadata,
    "hf-trainer-optimizer.pt": _hostile_trainer_optimizer,
}


@pytest.mark.parametrize("layout", HOSTILE)
def test_a_pickle_that_runs_code_is_refused_without_trust_pickle_and_never_runs(tmp_path, layout):
    marker = tmp_path / "code-ran"
    path = HOSTILE[layout](tmp_path, marker)
    before = hashes(path)
    result = run_cli("inspect", str(path))
    assert_clear_error(result, "mkdir", "--trust-pickle")
    assert not marker.exists()
    assert hashes(path) == before


@pytest.mark.parametrize("layout", ["torch-zip", "torch-legacy", "dcp-metadata"])
def test_trust_pickle_runs_the_pickled_code_and_warns_first(tmp_path, layout):
    marker = tmp_path / "code-ran"
    path = HOSTILE[layout](tmp_path, marker)
    result = run_cli("inspect", str(path), "--trust-pickle")
    # The payload is not an optimizer, so the run may still fail; what matters: the warning came, the code ran.
    assert "ostate: warning:" in result.stderr and "--trust-pickle" in result.stderr, result.stderr
    assert "any code pickled in this file runs now" in result.stderr
    assert marker.exists()


def test_payload_helper_really_runs_code_when_unpickled(tmp_path):
    # Guards the tests above: the payload is live.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(str(marker))))
    assert marker.exists()


# ---------------------------------------------------------------- headers that claim huge tensors
class _Storage:
    pass


class _Tensor:
    """Pickles as torch's own tensor rebuild call over a storage with any claimed size."""

    def __init__(self, storage: _Storage, size: tuple[int, ...]):
        self.storage, self.size = storage, size

    def __reduce__(self):
        stride = tuple(int(torch.tensor(self.size[i + 1 :], dtype=torch.float64).prod()) for i in range(len(self.size)))
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, stride, False, OrderedDict()))


def huge_torch_zip(path: Path, numel: int, size: tuple[int, ...]) -> None:
    """A torch.save zip whose pickle claims a storage of ``numel`` float32 elements (its record holds 6)."""
    source = path.with_suffix(".src")
    torch.save({"a": torch.zeros(6)}, source)
    reader = torch._C.PyTorchFileReader(str(source))
    storage = _Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):  # the tuple torch.save writes for a storage (torch/serialization.py)
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(
        {
            "state": {
                0: {"step": torch.tensor(1.0), "exp_avg": _Tensor(storage, size), "exp_avg_sq": _Tensor(storage, size)}
            },
            "param_groups": [
                {"params": [0], "lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}
            ],
        }
    )
    writer = torch._C.PyTorchFileWriter(str(path))
    for name in reader.get_all_records():
        if name in ("version", ".data/serialization_id"):  # the writer adds its own
            continue
        data = buffer.getvalue() if name == "data.pkl" else bytes(reader.get_record(name))
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    del writer
    source.unlink()


def huge_torch_legacy(path: Path, numel: int) -> None:
    """A legacy torch.save file whose storage claims ``numel`` elements: torch allocates the claim before reading."""
    torch.save({"a": torch.zeros(6)}, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    # The storage's element count follows the last pickle, as a little-endian int64 (torch/serialization.py,
    # _legacy_save: storage._write_file writes the size before the data).
    count = struct.pack("<q", 6)
    at = data.rindex(count, 0, len(data) - 24)
    data[at : at + 8] = struct.pack("<q", numel)
    path.write_bytes(bytes(data))


def huge_safetensors(path: Path, elements: int) -> None:
    header = json.dumps(
        {
            "state.0.exp_avg": {"dtype": "F32", "shape": [elements], "data_offsets": [0, elements * 4]},
            "__metadata__": {"ostate.format": "optimizer-state/1", "param_groups": "[]"},
        }
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))


def huge_dcp(directory: Path, elements: int) -> Path:
    spec = specimens.dcp(directory)
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    from ostate.formats.dcp.metadata import read_metadata

    metadata = read_metadata(str(spec.path / ".metadata"))
    key = next(k for k in metadata.state_dict_metadata if "exp_avg" in k)
    item = metadata.state_dict_metadata[key]
    item.size = torch.Size([elements])
    old = item.chunks[0]
    item.chunks = [ChunkStorageMetadata(torch.Size([0]), torch.Size([elements]))]
    for index in list(metadata.storage_data):
        if index.fqn == key:
            info = metadata.storage_data.pop(index)
            metadata.storage_data[type(index)(key, torch.Size([0]), index.index)] = info
    del old
    with open(spec.path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return spec.path


_CHILD = """
import resource, sys
limit = 3 << 30  # 3 GiB of address space: torch and the checkpoint fit; a 4 PB or 40 GB claim does not
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from ostate_cli.main import main
sys.argv = ["ostate", "inspect", sys.argv[1]]
main()
"""


def run_limited(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env, timeout=300, cwd=REPO
    )


HUGE = {
    "torch-zip storage 10^15": lambda d: (huge_torch_zip(d / "h.pt", 10**15, (10**15,)), d / "h.pt")[1],
    "torch-zip shape 10^16, storage 6": lambda d: (huge_torch_zip(d / "h.pt", 6, (10**8, 10**8)), d / "h.pt")[1],
    "torch-legacy storage 10^15": lambda d: (huge_torch_legacy(d / "h.pt", 10**15), d / "h.pt")[1],
    "torch-legacy storage 10^10": lambda d: (huge_torch_legacy(d / "h.pt", 10**10), d / "h.pt")[1],
    "safetensors 10^15": lambda d: (huge_safetensors(d / "h.safetensors", 10**15), d / "h.safetensors")[1],
    "dcp 10^15": lambda d: huge_dcp(d, 10**15),
    "dcp 10^10": lambda d: huge_dcp(d, 10**10),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", HUGE)
def test_a_header_claiming_a_huge_tensor_is_a_clear_error_without_allocating_it(tmp_path, case):
    path = HUGE[case](tmp_path)
    done = run_limited(path)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.strip().splitlines()[-1].startswith("ostate: error: ")
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr


# ---------------------------------------------------------------- damaged, empty, foreign, missing, looping
def _copy(spec: specimens.Specimen, tmp_path: Path) -> Path:
    target = tmp_path / spec.path.name
    (shutil.copytree if spec.path.is_dir() else shutil.copy)(spec.path, target)
    return target


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for at in range(0, len(data), max(1, len(data) // 7)):
        data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _main_file(spec_name: str, root: Path) -> Path:
    """The file of a layout that holds its optimizer state (or the layout's index)."""
    return {
        "torch-zip": lambda: root,
        "torch-legacy": lambda: root,
        "safetensors": lambda: root,
        "dcp": lambda: root / ".metadata",
        "hf-trainer": lambda: root / "optimizer.pt",
        "accelerate": lambda: root / "optimizer.bin",
        "deepspeed": lambda: next(root.glob("global_step*/zero_pp_rank_0_*optim_states.pt")),
    }[spec_name]()


@pytest.mark.parametrize("damage", [_truncate, _flip, _empty], ids=["truncated", "bit-flipped", "empty"])
@pytest.mark.parametrize("layout", list(specimens.BUILDERS))
def test_damaged_files_of_every_layout_are_one_clear_error(all_specimens, tmp_path, layout, damage):
    root = _copy(all_specimens[layout], tmp_path)
    damage(_main_file(layout, root))
    before = hashes(root)
    assert_clear_error(run_cli("inspect", str(root)))
    assert hashes(root) == before


def _data_file(spec_name: str, root: Path) -> Path:
    return {
        "dcp": lambda: next(root.glob("*.distcp")),
        "hf-trainer": lambda: root / "optimizer.pt",
        "accelerate": lambda: root / "optimizer.bin",
        "deepspeed": lambda: next(root.glob("global_step*/zero_pp_rank_1_*optim_states.pt")),
    }[spec_name]()


@pytest.mark.parametrize("layout", ["dcp", "hf-trainer", "accelerate", "deepspeed"])
def test_a_directory_missing_a_shard_or_the_optimizer_file_is_one_clear_error(all_specimens, tmp_path, layout):
    root = _copy(all_specimens[layout], tmp_path)
    _data_file(layout, root).unlink()
    result = run_cli("inspect", str(root))
    if layout == "accelerate":  # two optimizers: the one left is read, and the gap is named
        assert result.returncode == 0 and "no file for optimizer 0" in result.stdout + result.stderr, result.stdout
        return
    assert_clear_error(result)


@pytest.mark.parametrize("layout", ["dcp", "deepspeed"])
def test_a_partly_written_shard_is_one_clear_error(all_specimens, tmp_path, layout):
    root = _copy(all_specimens[layout], tmp_path)
    shard = _data_file(layout, root)
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_clear_error(run_cli("inspect", str(root)))


@pytest.mark.parametrize(
    "content,fragment",
    [
        (b"hello, this is text\n" * 20, "not a torch.save checkpoint"),
        (bytes(range(256)) * 8, "not a torch.save checkpoint"),
        (b"PK\x03\x04" + bytes(100), "cannot read as a torch checkpoint"),
        (b'{"not": "a checkpoint"}', "JSON file"),
        (struct.pack("<Q", 2) + b"{}", "no optimizer state"),
    ],
)
def test_files_that_are_not_checkpoints_are_one_clear_error(tmp_path, content, fragment):
    path = tmp_path / ("x.safetensors" if content.startswith(struct.pack("<Q", 2)) else "x.pt")
    path.write_bytes(content)
    assert_clear_error(run_cli("inspect", str(path)), fragment)


def test_symlink_loops_are_one_clear_error(tmp_path):
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    assert_clear_error(run_cli("inspect", str(loop)))
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    assert_clear_error(run_cli("inspect", str(a)))


def test_a_checkpoint_directory_with_a_symlink_loop_inside_still_reads(all_specimens, tmp_path):
    root = _copy(all_specimens["hf-trainer"], tmp_path)
    (root / "cycle").symlink_to(root, target_is_directory=True)  # a walk that follows links never ends
    (root / "self.pt").symlink_to(root / "self.pt")
    result = run_cli("inspect", str(root), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)


def test_a_fifo_where_a_file_should_be_does_not_hang(all_specimens, tmp_path):
    root = _copy(all_specimens["hf-trainer"], tmp_path)
    (root / "optimizer.pt").unlink()
    os.mkfifo(root / "optimizer.pt")  # opening it for reading would wait for a writer forever
    assert_clear_error(run_cli("inspect", str(root)))
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    assert_clear_error(run_cli("inspect", str(fifo)))


# Root reads every file whatever its permissions; without these two capabilities it is
# held to them like any user (and still owns, so can run, this checkout's Python).
_WITHOUT_OVERRIDE = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
]


def _without_override(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the ostate CLI held to file permissions (as root: without the capabilities that override them)."""
    prefix = _WITHOUT_OVERRIDE if os.geteuid() == 0 else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "ostate_cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )


@pytest.mark.slow
def test_unreadable_files_and_directories_are_one_clear_error(all_specimens, tmp_path):
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop the permission-override capabilities")
    readable = _copy(all_specimens["torch-zip"], tmp_path)
    control = _without_override("inspect", str(readable), "--by", "model")
    assert control.returncode == 0, control.stderr  # the setup itself can read a readable file
    locked = tmp_path / "locked.pt"
    shutil.copy(readable, locked)
    locked.chmod(0)
    folder = _copy(all_specimens["hf-trainer"], tmp_path)
    try:
        assert_clear_error(_without_override("inspect", str(locked)), "ermission denied")
        (folder / "optimizer.pt").chmod(0)
        assert_clear_error(_without_override("inspect", str(folder)))
        folder.chmod(0o300)  # a directory that cannot be listed
        assert_clear_error(_without_override("inspect", str(folder)))
    finally:
        folder.chmod(0o700)
        for p in [locked, *folder.rglob("*")]:
            p.chmod(0o600 if p.is_file() else 0o700)


# ---------------------------------------------------------------- unusual but valid state
def _saved(tmp_path: Path, state: dict, params: list[torch.Tensor]) -> Path:
    path = tmp_path / "s.pt"
    groups = [
        {
            "params": list(range(len(params))),
            "lr": 1e-3,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.0,
            "amsgrad": False,
            "foreach": None,
            "maximize": False,
            "capturable": False,
            "differentiable": False,
            "fused": None,
        }
    ]
    torch.save({"state": state, "param_groups": groups}, path)
    return path


def test_nan_and_inf_in_the_state_are_counted_not_fatal(tmp_path):
    exp_avg = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    exp_avg_sq = torch.tensor([1.0, 4.0, float("inf"), 9.0])
    path = _saved(
        tmp_path, {0: {"step": torch.tensor(3.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}}, [torch.zeros(4)]
    )
    row = ostate.analyze(ostate.load(path)).iloc[0]
    assert row["exp_avg_abs_nonfinite"] == 2 and row["exp_avg_sq_nonfinite"] == 1
    assert (row["exp_avg_abs_min"], row["exp_avg_abs_max"], row["exp_avg_sq_max"]) == (1.0, 2.0, 9.0)
    assert run_cli("inspect", str(path)).returncode == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_state_is_read_in_its_own_dtype(tmp_path, dtype):
    model, opt = _trained()
    state = opt.state_dict()
    for values in state["state"].values():  # stored in half precision, as mixed-precision trainers may
        values["exp_avg"], values["exp_avg_sq"] = values["exp_avg"].to(dtype), values["exp_avg_sq"].to(dtype)
    path = tmp_path / "half.pt"
    torch.save({"model": model.to(dtype).state_dict(), "optimizer": state}, path)
    table = ostate.analyze(ostate.load(path))
    assert table.iloc[0]["dtype"] == str(dtype).removeprefix("torch.")
    first = state["state"][0]["exp_avg_sq"].float()
    assert table.iloc[0]["exp_avg_sq_max"] == pytest.approx(float(first.max()), rel=1e-6)
    assert table.iloc[0]["exp_avg_sq_mean"] == pytest.approx(float(first.mean()), rel=1e-4)


def test_uint8_and_zero_size_state_tensors_are_read(tmp_path):
    # 8-bit optimizers' uint8 state with its code book is covered in test_bnb8bit.py; here a bare uint8 tensor.
    codes = torch.arange(0, 256, dtype=torch.uint8).reshape(16, 16)
    state = {
        0: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(0), "exp_avg_sq": torch.zeros(0)},
        1: {"step": torch.tensor(2.0), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)},
        2: {"codes": codes},
    }
    path = _saved(tmp_path, state, [torch.zeros(0), torch.zeros(3), codes])
    table = ostate.analyze(ostate.load(path))
    assert list(table["numel"]) == [0, 3, 256]
    assert table.iloc[1]["exp_avg_mean"] == 1.0
    assert (table.iloc[2]["dtype"], table.iloc[2]["state_bytes"]) == ("uint8", 256)
    assert run_cli("inspect", str(path)).returncode == 0


def test_many_tiny_parameters_give_one_row_each(tmp_path):
    # The 100,000-parameter case is measured in benchmarks/bench_many_params.py; this checks the same path for rows.
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(2)) for _ in range(3000)]
    opt = torch.optim.AdamW(weights, lr=1e-3, foreach=True)
    for w in weights:
        w.grad = torch.randn(2)
    opt.step()
    path = tmp_path / "many.pt"
    torch.save(opt.state_dict(), path)
    table = ostate.analyze(ostate.load(path))
    assert len(table) == 3000
    sq = opt.state_dict()["state"][2999]["exp_avg_sq"]
    assert table.iloc[2999]["exp_avg_sq_max"] == pytest.approx(float(sq.max()), rel=1e-6)


# ---------------------------------------------------------------- inputs are never changed
@pytest.mark.parametrize("layout", list(specimens.BUILDERS))
def test_every_command_leaves_every_input_byte_for_byte_unchanged(all_specimens, tmp_path, layout):
    root = all_specimens[layout].path
    before = hashes(root)
    stamps = {p: os.stat(p).st_mtime_ns for p in before}
    assert run_cli("inspect", str(root), "--format", "json").returncode == 0
    out = tmp_path / "out.safetensors"
    pick = ["--optimizer-index", "0"] if layout == "accelerate" else []
    converted = run_cli("convert", str(root), str(out), *pick)
    assert converted.returncode == 0, converted.stderr
    again = run_cli("convert", str(out), str(tmp_path / "back.pt"))
    assert again.returncode == 0, again.stderr
    assert run_cli("doctor", str(root)).returncode in (0, 3, 4)  # 3, 4: findings (warnings, errors)
    assert run_cli("compare", str(root), str(root), *pick).returncode == 0
    reset_out = tmp_path / ("reset" + (root.suffix if root.is_file() else ""))
    reset = run_cli("reset", str(root), "--strategy", "reset-v", "-o", str(reset_out), *pick)
    assert reset.returncode == 0, reset.stderr
    assert hashes(root) == before
    assert {p: os.stat(p).st_mtime_ns for p in before} == stamps
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["back.pt", "out.safetensors", reset_out.name])
    assert not [p for p in tmp_path.rglob(".ostate-*")]  # no temporary files left


def test_state_keys_that_are_not_strings_are_shown_not_fatal(tmp_path):
    # Found by benchmarks/fuzz_readers.py: a flipped byte turned a key into a tuple, and sorting the keys failed.
    state = {0: {"exp_avg": torch.ones(3), ("odd",): torch.ones(3), 7: torch.ones(3)}}
    path = _saved(tmp_path, state, [torch.zeros(3)])
    optimizer = ostate.load(path).optimizers[0]
    assert optimizer.kind == "unknown" and "7" in optimizer.warnings[0]


# ---------------------------------------------------------------- found by the longer fuzz run
def _adam_state(tmp_path: Path, step, betas) -> Path:
    path = tmp_path / "s.pt"
    groups = [
        {
            "params": [0],
            "lr": 1e-3,
            "betas": betas,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
        }
    ]
    state = {0: {"step": step, "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)}}
    torch.save({"state": state, "param_groups": groups}, path)
    return path


@pytest.mark.parametrize(
    "step,betas,fragment",
    [
        (-5.0, (0.9, 0.999), "step -5.0 is not a step count"),
        (3.0, (0.9, 1.5), "betas (0.9, 1.5) are not in [0, 1]"),
    ],
)
def test_a_step_or_betas_no_torch_optimizer_can_have_is_one_clear_error(tmp_path, step, betas, fragment):
    # Before: a complex number from sqrt(1 - beta2 ** step), "internal error" with exit code 1.
    path = _adam_state(tmp_path, step, betas)
    before = sha256(path)
    assert_clear_error(run_cli("inspect", str(path)), fragment)
    assert_clear_error(run_cli("doctor", str(path)), fragment)
    assert sha256(path) == before


@pytest.mark.parametrize("step", [float("inf"), float("nan"), 10**400], ids=["inf", "nan", "int-beyond-float"])
def test_a_non_finite_step_is_read_and_doctor_reports_it(tmp_path, step):
    # Before: an int too large for a float raised OverflowError while loading (exit code 1).
    path = _adam_state(tmp_path, step, (0.9, 0.999))
    assert run_cli("inspect", str(path)).returncode == 0
    doctor = run_cli("doctor", str(path))
    assert doctor.returncode == 4 and "nonfinite-state" in doctor.stdout, (doctor.stdout, doctor.stderr)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_files_that_unpickle_but_lack_deepspeeds_layout_are_one_clear_error(tmp_path):
    # Before: KeyError / TypeError from deep inside the reader (exit code 1). The fixture is
    # ours, so it may be unpickled fully to damage it; ostate reads it back safely.
    folder = tmp_path / "zero3"
    shutil.copytree(REPO / "tests" / "fixtures" / "deepspeed" / "zero3_subgroups", folder)
    optim = folder / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    saved = torch.load(optim, weights_only=False)
    saved["optimizer_state_dict"]["optimizer_state_dict"] = ("not", "a dict")
    torch.save(saved, optim)
    assert_clear_error(run_cli("inspect", str(folder)), "do not have the layout DeepSpeed writes")
    del saved["optimizer_state_dict"]["fp32_flat_groups"]
    torch.save(saved, optim)
    assert_clear_error(run_cli("inspect", str(folder)))


# ---------------------------------------------------------------- ostate's own pickle reader
def _refused(data: bytes, fragment: str, storage=None) -> None:
    from ostate.formats.files.torch_pickle import Unsupported, unpickle

    with pytest.raises(Unsupported, match=fragment):
        unpickle(data, storage or (lambda key, dtype, numel: torch.zeros(4, dtype=dtype)[:numel]))


@pytest.mark.parametrize(
    ("opcodes", "refused"),
    [
        (b"\x80\x02]}b.", "BUILD of something other than an OrderedDict"),
        (b"\x80\x02ccollections\nOrderedDict\n)R}X\t\x00\x00\x00__class__K\x01sb.", "not a plain name"),
        (b"\x80\x02(cos\nsystem\nX\x02\x00\x00\x00lsi.", "global os.system"),  # INST names its class in place
        (b"\x80\x02(c__builtin__\nobject\no.", "global __builtin__.object"),
        (b"\x80\x02c__builtin__\nobject\n)\x81.", "global __builtin__.object"),  # NEWOBJ
        (b"\x80\x02I1\n.", "opcode INT"),  # the text forms are refused too
        (b"\x80\x02X\x01\x00\x00\x00aX\x01\x00\x00\x00b\x93.", "opcode STACK_GLOBAL"),
        (b"\x80\x05N.", "pickle protocol 5"),
        (b"\x80\x02)0N.", "opcode POP"),
        (
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(NK\x00))\x89ccollections\nOrderedDict\n)RtR.",
            "arguments torch.save does not write",
        ),
        (b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R.", "OrderedDict built from arguments"),
        (b"\x80\x02ctorch\nFloatStorage\n)R.", "storage class called"),
        (b"\x80\x02X\x01\x00\x00\x00aQ.", "persistent id that is not a storage"),
        (b"\x80\x02]K\x01K\x02s.", "SETITEM on something that is not a dict"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_ostates_pickle_reader_refuses_opcodes_and_globals_torch_save_does_not_write(opcodes, refused):
    _refused(opcodes, refused)


def test_ostates_pickle_reader_never_runs_a_payload_and_the_file_still_ends_in_one_clear_line(tmp_path):
    marker = tmp_path / "ran"
    _refused(pickle.dumps(Payload(str(marker)), protocol=2), "global posix.mkdir")
    path = _hostile_torch_zip(tmp_path, marker)
    from ostate.formats.files.torch_pickle import Unsupported, read_torch_zip

    with pytest.raises(Unsupported, match="posix.mkdir"):
        read_torch_zip(str(path))
    assert_clear_error(run_cli("inspect", str(path)), "needs pickled Python objects", "posix.mkdir")
    assert not marker.exists()


def test_ostates_pickle_reader_refuses_every_truncation_of_a_real_index(tmp_path):
    from ostate.formats.files.torch_pickle import TorchArchive

    path = tmp_path / "ckpt.pt"
    _, opt = _trained()
    torch.save({"optimizer": opt.state_dict()}, path)
    archive = TorchArchive(str(path))
    data = archive.pickle()
    for end in range(len(data)):
        _refused(data[:end], "truncated|damaged|runs past|does not end", archive.storage)


@pytest.mark.parametrize(
    ("opcodes", "refused"),
    [
        (b"\x80\x02X\xff\xff\xff\xffab.", "string of 4294967295 bytes"),
        (b"\x80\x02\x8b\xff\xff\xff\x7f.", "integer of 2147483647 bytes"),
        (b"\x80\x02j\xff\xff\xff\xff.", "damaged"),  # a memo entry that was never put
        (b"\x80\x02(((((t.", "does not end with one object"),
    ],
    ids=["string", "long4", "memo", "marks"],
)
def test_ostates_pickle_reader_refuses_huge_counts_without_allocating(opcodes, refused):
    _refused(opcodes, refused)


def _storage_pid(numel: int) -> bytes:
    return (
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu\x8a\x08"
        + struct.pack("<q", numel)
        + b"tQ"
    )


def test_ostates_pickle_reader_checks_every_tensor_against_its_storage_record(tmp_path):
    from ostate.formats.files.torch_pickle import TorchArchive, Unsupported, unpickle

    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(6.0)}, path)
    rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n"
    hooks = b"ccollections\nOrderedDict\n)R"

    def tensor(numel: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
        ints = lambda xs: b"(" + b"".join(b"J" + struct.pack("<i", x) for x in xs) + b"t"  # noqa: E731
        return (
            b"\x80\x02"
            + rebuild
            + b"("
            + _storage_pid(numel)
            + b"J"
            + struct.pack("<i", offset)
            + ints(size)
            + (ints(stride) + b"\x89" + hooks + b"tR.")
        )

    assert unpickle(tensor(6, (2, 3), (3, 1)), TorchArchive(str(path)).storage).tolist() == [[0, 1, 2], [3, 4, 5]]
    for data, refused in [
        (tensor(1 << 40, (1,), (1,)), "claims 1099511627776 elements"),
        (tensor(6, (1 << 20, 1 << 20), (1 << 20, 1)), "reaches element"),
        (tensor(6, (2, 3), (3, 1), offset=1), "reaches element 6"),
        (tensor(6, (3,), (-1,)), "non-negative"),
        (tensor(-1, (1,), (1,)), "claims -1 elements"),
    ]:
        with pytest.raises(Unsupported, match=refused):
            unpickle(data, TorchArchive(str(path)).storage)
