"""What ostate does below Python: the optional compiled loops, and process tuning for the ``ostate`` program.

- :mod:`~ostate.analysis.native.kernels` loads ``_kernels.c`` (built at install when a C
  compiler is present) and says whether it is active;
- :mod:`~ostate.analysis.native.tuning` tunes the process (torch's intra-op threads,
  glibc's allocator, the cyclic garbage collector) for the ``ostate`` program, which
  enters it around each command; the library itself changes none of these.
"""
