"""Fixtures of the trainer tests (defined in tests/tiny_train.py, shared with tests/synth)."""

from tiny_train import helpers, make_data, one_thread, tiny64, tiny_ckpt

__all__ = ["helpers", "make_data", "one_thread", "tiny64", "tiny_ckpt"]
