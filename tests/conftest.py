"""Fixtures for the whole suite."""

import pytest


@pytest.fixture
def no_weights(monkeypatch):
    """Any read of a checkpoint's weights fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr("qwen2vl.weights.read_state_dict", fail)
    monkeypatch.setattr("qwen2vl.generation.load.load_model", fail)
