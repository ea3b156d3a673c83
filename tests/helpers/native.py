"""Build ostate's compiled loops (``ostate/analysis/native/_kernels.c``) outside the source tree, for the tests.

A checkout where ``pip install`` has not built them (a clean tree, the ``.so`` deleted) runs
its tests with a build made here (tests/conftest.py: ``compiled_loops``): ``setup.py
build_ext`` into a temporary directory, the extension exactly as an install builds it; where
setuptools is not importable, the C compiler directly with setup.py's flags.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.common import REPO

SOURCE = REPO / "ostate" / "analysis" / "native" / "_kernels.c"


def c_compiler() -> str | None:
    """A C compiler on PATH, or None."""
    return next((name for name in ("cc", "gcc", "clang") if shutil.which(name)), None)


@dataclass
class Build:
    path: Path | None  # the shared library, or None when nothing was built
    how: str  # "setup.py build_ext" or the compiler's command line
    log: str  # what the build printed


def build_kernels(directory: str | os.PathLike) -> Build:
    """Build ``_kernels.c`` into ``directory``: with ``setup.py build_ext`` where setuptools is
    importable, else with the C compiler and setup.py's flags."""
    directory = Path(directory)
    if importlib.util.find_spec("setuptools") is not None:
        return _with_setup_py(directory)
    return _with_compiler(directory)


def _with_setup_py(directory: Path) -> Build:
    done = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "build_ext",
            "--build-lib",
            str(directory / "lib"),
            "--build-temp",
            str(directory / "temp"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # The extension is optional: a failed build still exits 0, without the file.
    built = sorted((directory / "lib" / "ostate" / "analysis" / "native").glob("_kernels.*"))
    return Build(built[0] if built else None, "setup.py build_ext", done.stdout + done.stderr)


def _with_compiler(directory: Path) -> Build:
    cc = c_compiler()
    if cc is None:
        return Build(None, "no C compiler", "")
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "_kernels.abi3.so"
    limited = [] if sysconfig.get_config_var("Py_GIL_DISABLED") else ["-DPy_LIMITED_API=0x030A0000"]  # as setup.py
    command = [
        cc,
        "-O3",
        "-shared",
        "-fPIC",
        *limited,
        f"-I{sysconfig.get_paths()['include']}",
        str(SOURCE),
        "-o",
        str(out),
    ]
    if sys.platform == "darwin":  # Python's symbols come from the interpreter that loads it
        command[1:1] = ["-undefined", "dynamic_lookup"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return Build(out if done.returncode == 0 and out.exists() else None, " ".join(command), done.stdout + done.stderr)
