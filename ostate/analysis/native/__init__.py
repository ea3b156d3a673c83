"""What ostate does below Python: the optional compiled loops, and process tuning for the ``ostate`` program.

- :mod:`~ostate.analysis.native.kernels` loads ``_kernels.c`` (built at install when a C
  compiler is present) and says whether it is active;
- :mod:`~ostate.analysis.native.allocator` and :mod:`~ostate.analysis.native.gcpause`
  tune the process (glibc's allocator, the cyclic garbage collector).
"""
