"""ostate inside other libraries' training loops.

- :mod:`ostate.integrations.transformers`: callbacks for the Hugging Face ``Trainer``.
- :mod:`ostate.integrations.lightning`: callbacks for the Lightning ``Trainer``.

The monitor's callbacks live in :mod:`ostate.integrations.hf_monitor` and
:mod:`ostate.integrations.lightning_monitor` and are imported by the two modules above
(``MonitorCallback``).

Each module imports its library, an optional extra: import the one you use.
"""
