"""Fixtures of the synthetic-world and recipe tests; the trainer's tiny checkpoints and data
writers come from tests/tiny_train.py (as in tests/train)."""

from pathlib import Path

import pytest
from tiny_train import helpers, make_data, tiny64, tiny_ckpt

from qwen2vl.processor import load_processor

__all__ = ["helpers", "make_data", "processor", "tiny64", "tiny_ckpt"]


@pytest.fixture(scope="session")
def processor():
    """The processor the recipe trains with (qwen2vl/synth/recipe/model)."""
    return load_processor(Path(__file__).parents[2] / "qwen2vl/synth/recipe/model")
