"""Fixtures of the synthetic-world tests."""

from pathlib import Path

import pytest

from qwen2vl.processor import load_processor


@pytest.fixture(scope="session")
def processor():
    """The processor the recipe trains with (recipes/default/model)."""
    return load_processor(Path(__file__).parents[2] / "recipes/default/model")
