"""Watch the optimizer state while training: :class:`Monitor`, its writers and its checks.

- :mod:`ostate.monitor.monitor`: :class:`Monitor`, summarising the live state every N steps;
- :mod:`ostate.monitor.live`: a live optimizer as an ``OptimizerState``, no tensor copied;
- :mod:`ostate.monitor.deepspeed_live`: DeepSpeed ZeRO's flat partitions cut into the model's parameters;
- :mod:`ostate.monitor.ranks`: data-parallel ranks, each summarising its share, merged on rank 0;
- :mod:`ostate.monitor.writers`: the CSV log (default), TensorBoard and W&B, and :func:`read_log`;
- :mod:`ostate.monitor.watch`: the checks that fire while training.

The callbacks for the Hugging Face and Lightning trainers are in :mod:`ostate.integrations`.
"""

from ostate.monitor.monitor import Monitor
from ostate.monitor.watch import MonitorWarning
from ostate.monitor.writers import CSVWriter, Record, TensorBoardWriter, WandbWriter, read_log

__all__ = ["CSVWriter", "Monitor", "MonitorWarning", "Record", "TensorBoardWriter", "WandbWriter", "read_log"]
