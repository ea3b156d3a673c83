"""Callbacks for the Lightning ``Trainer`` (lightning is an optional extra)."""
