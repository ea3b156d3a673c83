"""The ``ostate`` command line: a thin click layer over the ostate library (installed as ``ostate_cli``)."""
