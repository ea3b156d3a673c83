"""ostate inside other libraries' training loops.

- :mod:`ostate.integrations.transformers`: callbacks for the Hugging Face ``Trainer``.
- :mod:`ostate.integrations.lightning`: callbacks for the Lightning ``Trainer``.

Each module imports its library, an optional extra: import the one you use.
"""
