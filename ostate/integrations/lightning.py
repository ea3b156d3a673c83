"""Callbacks for the Lightning ``Trainer`` (lightning is an optional extra)."""

from ostate.integrations.lightning_strategy import StrategyCallback as StrategyCallback
