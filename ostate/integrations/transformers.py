"""Callbacks for the Hugging Face ``transformers.Trainer`` (transformers is an optional extra)."""
