"""Callbacks for the Lightning ``Trainer`` (lightning is an optional extra)."""

from ostate.integrations.lightning_monitor import MonitorCallback as MonitorCallback
from ostate.integrations.lightning_strategy import StrategyCallback as StrategyCallback
