"""Only the optional compiled loops live here; everything else is in pyproject.toml.

``ostate/analysis/native/_kernels.c`` is built when a C compiler is present. When it cannot be
built (``optional=True``) the install still succeeds and ostate computes the same
statistics with torch ops (ostate.analysis.native.kernels).

The file is loaded with ctypes and uses no Python API beyond an empty module, so it is
built against the stable ABI of Python 3.10 (``Py_LIMITED_API``): one
``_kernels.abi3.so`` and one wheel per platform serve every Python from 3.10 on. The
free-threaded build of CPython has no stable ABI yet; there it is built for that one version.
"""

import sys
import sysconfig

from setuptools import Extension, setup

LIMITED_API = not sysconfig.get_config_var("Py_GIL_DISABLED")

setup(
    ext_modules=[
        Extension(
            "ostate.analysis.native._kernels",
            sources=["ostate/analysis/native/_kernels.c"],
            extra_compile_args=["/O2"] if sys.platform.startswith("win") else ["-O3"],
            define_macros=[("Py_LIMITED_API", "0x030A0000")] if LIMITED_API else [],
            py_limited_api=LIMITED_API,
            optional=True,
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if LIMITED_API else {},
)
