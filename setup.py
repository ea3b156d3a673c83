"""Only the optional compiled loops live here; everything else is in pyproject.toml.

``ostate/analysis/native/_kernels.c`` is built when a C compiler is present. When it cannot be
built (``optional=True``) the install still succeeds and ostate computes the same
statistics with torch ops (ostate.analysis.native.kernels).
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ostate.analysis.native._kernels",
            sources=["ostate/analysis/native/_kernels.c"],
            extra_compile_args=["/O2"] if sys.platform.startswith("win") else ["-O3"],
            optional=True,
        )
    ]
)
