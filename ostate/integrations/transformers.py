"""Callbacks for the Hugging Face ``transformers.Trainer`` (transformers is an optional extra)."""

from ostate.integrations.hf_monitor import MonitorCallback as MonitorCallback
from ostate.integrations.hf_strategy import StrategyCallback as StrategyCallback
