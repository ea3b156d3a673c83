"""Every command that writes, on a disk that fills up, a read-only one and a folder it may not write to:
one line naming the output, what happened and what to do, exit code 2, nothing partial or temporary left.

The file systems are real (tests/helpers/confined.py says how each is made and why): a
tmpfs of 16 KiB that the output outgrows part-way (``ENOSPC``; torch's zip writer reports
its short write as "unexpected pos"), a read-only bind mount (``EROFS``), a ``chmod 0555``
folder with the permission-override capabilities dropped (``EACCES``). ``EDQUOT`` cannot be
made here without quotas on a file system, so it, and every other refusal, is also raised
by a file object under real ``torch.save`` and matplotlib writes.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from ostate.outputs import WriteRefused, atomic_directory, atomic_file, atomic_path
from tests.helpers import confined
from tests.helpers.common import REPO, run_cli

KIB16 = 16 * 1024
EXPECTED = {
    "full": ("no space left on the device", "the write stopped short", "the file grew past"),
    "readonly": ("the file system is read-only",),
    "denied": ("permission denied",),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints whose outputs outgrow 16 KiB: a torch.save file, a second one, a DCP folder; the ablation example."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root = tmp_path_factory.mktemp("inputs")
    paths = {}
    for name, seed in (("ckpt", 0), ("other", 1)):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 8))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            model(torch.randn(4, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        paths[name] = root / f"{name}.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, paths[name])
        if name == "ckpt":
            paths["dcp"] = root / "dcp"
            state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=str(paths["dcp"]), no_dist=True)
    shutil.copytree(REPO / "examples" / "ablation", root / "ablation")
    paths["spec"] = root / "ablation" / "spec.toml"
    paths["store"] = root / "ablation" / "results.sqlite"  # the ablation's store stays writable in the full case
    return paths


def _commands(inputs: dict[str, Path], folder: Path, mode: str) -> dict[str, tuple[list[str], Path]]:
    """Each writing command with its output inside ``folder``: name -> (argv, the output it must name)."""
    ablate_store = inputs["store"] if mode == "full" else folder / "results.sqlite"
    ablate = [
        "ablate",
        str(inputs["spec"]),
        "--strategies",
        "reload,reset-v",
        "--seeds",
        "0",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--workers",
        "1",
        "--store",
        str(ablate_store),
        "--out",
        str(folder / "out"),
    ]
    return {
        "reset": (["reset", str(inputs["ckpt"]), "--strategy", "reset-m", "-o", str(folder / "r.pt")], folder / "r.pt"),
        "reset-dcp": (["reset", str(inputs["dcp"]), "--strategy", "reset-v", "-o", str(folder / "r")], folder / "r"),
        "convert-safetensors": (
            ["convert", str(inputs["ckpt"]), str(folder / "o.safetensors")],
            folder / "o.safetensors",
        ),
        "convert-torch": (["convert", str(inputs["ckpt"]), str(folder / "o.pt")], folder / "o.pt"),
        "plot": (["plot", str(inputs["ckpt"]), "-o", str(folder / "p.png")], folder / "p.png"),
        "compare-plot": (
            ["compare", str(inputs["ckpt"]), str(inputs["other"]), "--plot", str(folder / "c.png")],
            folder / "c.png",
        ),
        "demo": (["demo", "--dir", str(folder), "--steps", "2"], folder / "checkpoint.pt"),
        # a full disk: the store (elsewhere) keeps the trials, the tables and plots fail; else the store fails
        "ablate": (ablate, folder / "out" if mode == "full" else ablate_store),
    }


def _run(inputs: dict[str, Path], work: Path, mode: str) -> dict[str, tuple[confined.Outcome, Path, Path]]:
    cases, named = [], {}
    for name, (argv, output) in _commands(inputs, work / "x", mode).items():
        folder = work / name
        folder.mkdir()
        argv = [a.replace(str(work / "x"), str(folder)) for a in argv]
        output = Path(str(output).replace(str(work / "x"), str(folder)))
        store = str(inputs["store"]) if name == "ablate" and mode == "full" else None
        cases.append(confined.Case(argv, str(folder), mode, KIB16, count_trials=store))
        named[name] = (folder, output)
    if mode == "denied":
        for folder, _ in named.values():
            folder.chmod(0o555)
    try:
        outcomes = confined.run_confined(cases, work)
    finally:
        for folder, _ in named.values():
            folder.chmod(0o755)
    return {name: (outcome, *named[name]) for name, outcome in zip(named, outcomes)}


def _assert_refused(name: str, outcome: confined.Outcome, folder: Path, output: Path, mode: str) -> None:
    lines = outcome.stderr.strip().splitlines()
    if name == "ablate":  # stderr is not a terminal: its plain progress lines come first
        lines = [line for line in lines if not re.match(r"\S+ trials: \d+/\d+ trials \(", line)]
    if name == "demo":  # it says first what it is about to do
        assert lines[0].startswith("training a small model for 2 steps and saving"), lines
        lines = lines[1:]
    assert outcome.returncode == 2, (name, outcome.stderr)
    assert len(lines) == 1 and lines[0].startswith("ostate: error: "), (name, outcome.stderr)
    line = lines[0]
    assert "cannot write: " in line and "bug" not in line, (name, line)
    assert any(what in line for what in EXPECTED[mode]), (name, line)
    if name == "ablate":  # RLIMIT_FSIZE (no namespaces) limits the store elsewhere too
        assert str(output) in line or str(folder) in line or "results.sqlite: cannot write" in line, (name, line)
        assert "every finished trial is kept in" in line and "rerun the same command to continue" in line, line
    else:
        assert f"ostate: error: {output}: cannot write" in line, (name, line)
    assert "(" in line and line.endswith(")"), line  # what to do, in the hint
    temporary = [f for f in outcome.left if ".ostate-" in f or f.endswith(".tmp")]
    assert not temporary, (name, outcome.left)
    if name != "ablate":  # the ablation's finished tables are whole files; nothing else may stay
        assert outcome.left == [], (name, outcome.left)


@pytest.mark.slow
def test_every_writing_command_on_a_full_file_system(inputs, tmp_path):
    outcomes = _run(inputs, tmp_path, "full")  # a tmpfs, or RLIMIT_FSIZE without namespaces
    for name, (outcome, folder, output) in outcomes.items():
        _assert_refused(name, outcome, folder, output, "full")
    assert {o.mechanism for o, _, _ in outcomes.values()} <= {"tmpfs", "RLIMIT_FSIZE"}
    # the ablation kept its trials, and a rerun with room for the outputs continues from them
    ablate, _, _ = outcomes["ablate"]
    if ablate.mechanism != "tmpfs":
        return  # the file size limit held the store back too; the read-only test covers a store that fails
    assert ablate.trials == 2
    argv = _commands(inputs, tmp_path / "roomy", "full")["ablate"][0]
    again = run_cli(*argv)
    assert again.returncode == 0, again.stderr
    assert "0 trials ran, 2 were already" in again.stderr


@pytest.mark.slow
def test_every_writing_command_on_a_read_only_file_system(inputs, tmp_path):
    if not confined.namespaces_work():
        pytest.skip("no user and mount namespaces here to mount a folder read-only (chmod does not stop root)")
    for name, (outcome, folder, output) in _run(inputs, tmp_path, "readonly").items():
        _assert_refused(name, outcome, folder, output, "readonly")


@pytest.mark.slow
def test_every_writing_command_in_a_folder_it_may_not_write_to(inputs, tmp_path):
    if not confined.can_drop_override():
        pytest.skip("running as root without setpriv to drop the permission-override capabilities")
    for name, (outcome, folder, output) in _run(inputs, tmp_path, "denied").items():
        _assert_refused(name, outcome, folder, output, "denied")


# ---------------------------------------------------------------- every refusal, through the real writers
REFUSALS = [
    (errno.ENOSPC, "no space left on the device"),
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EFBIG, "the file grew past"),
    (errno.EROFS, "read-only"),
    (errno.EACCES, "permission denied"),
]


class _Refusing(io.RawIOBase):
    """A file that takes ``room`` bytes, then refuses with ``code`` (as the kernel's write would)."""

    def __init__(self, target, code: int, room: int):
        self.target, self.code, self.room = target, code, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(data)
        return self.target.write(data)


@pytest.mark.parametrize("code, what", REFUSALS, ids=[errno.errorcode[c] for c, _ in REFUSALS])
def test_torch_save_refused_mid_file_names_the_output_and_leaves_nothing(tmp_path, code, what):
    target = tmp_path / "r.pt"
    state = {"w": torch.zeros(50_000)}
    with pytest.raises(WriteRefused) as caught:
        with atomic_file(target) as f:
            torch.save(state, _Refusing(f, code, room=4096))  # torch reports it as "unexpected pos"
    assert what in str(caught.value) and str(caught.value).startswith(f"{target}: cannot write: ")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("code, what", REFUSALS, ids=[errno.errorcode[c] for c, _ in REFUSALS])
def test_a_refused_directory_output_names_it_and_leaves_nothing(tmp_path, code, what):
    with pytest.raises(WriteRefused, match=what):
        with atomic_directory(tmp_path / "out") as tmp:
            (Path(tmp) / "a.bin").write_bytes(b"x")
            raise OSError(code, os.strerror(code), os.path.join(tmp, "b.bin"))
    assert os.listdir(tmp_path) == []


def test_a_directory_where_the_file_goes_is_one_clear_line(tmp_path, inputs):
    folder = tmp_path / "taken"
    folder.mkdir()
    for argv in (
        ["reset", str(inputs["ckpt"]), "--strategy", "reset-m", "-o", str(folder), "--overwrite"],
        ["convert", str(inputs["ckpt"]), str(folder), "--overwrite"],
        ["plot", str(inputs["ckpt"]), "-o", str(folder)],
        ["compare", str(inputs["ckpt"]), str(inputs["other"]), "--plot", str(folder)],
    ):
        result = run_cli(*argv)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (argv, result.stderr)
        # convert's OUT is a click path argument: click's own usage error says it (its layout is cli/main.py's)
        last = result.stderr.strip().splitlines()[-1]
        assert str(folder) in last and "directory" in last, result.stderr
    assert os.listdir(folder) == []


def test_an_error_reading_an_input_is_not_called_a_refused_write(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "out.csv"):
            raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/else/input.pt")
    assert os.listdir(tmp_path) == []


def test_the_monitor_and_other_non_atomic_writers_get_the_same_line(tmp_path):
    from ostate.outputs import refused_writes

    log = tmp_path / "metrics.csv"
    with pytest.raises(WriteRefused, match=r"metrics.csv: cannot write: no space left on the device \(free space"):
        with refused_writes(log), open(log, "w") as f:
            f.write("step,loss\n")
            raise OSError(errno.ENOSPC, "No space left on device")


def test_the_command_lines_last_resort_for_a_refusal_met_elsewhere():
    """A write outside ostate.outputs that the disk refuses is still one line and exit 2; a permission
    error there stays an internal error (reading can cause it too, so it is not called a refused write)."""
    import click
    from click.testing import CliRunner

    from ostate_cli.common import handle_errors

    @click.command()
    @click.argument("code", type=int)
    @handle_errors
    def writes(code):
        raise OSError(code, os.strerror(code), "/data/log.csv")

    full = CliRunner().invoke(writes, [str(errno.ENOSPC)])
    assert full.exit_code == 2
    assert full.stderr == (
        "ostate: error: /data/log.csv: cannot write: no space left on the device "
        "(free space on that file system, or choose an output path on another one)\n"
    )
    denied = CliRunner().invoke(writes, [str(errno.EACCES)])
    assert denied.exit_code == 1 and "internal error" in denied.stderr
