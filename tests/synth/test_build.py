"""The build script's pieces that run without training: each stage config is a train config plus
objectives the recipe knows, built in the order the trainer calls them."""

import pytest

from qwen2vl.synth.box_attention import BoxAttention
from qwen2vl.synth.box_regression import BoxRegression
from qwen2vl.synth.build import RECIPE, STAGES, stage_objectives
from qwen2vl.synth.vocab import LumpedVocab
from qwen2vl.train.config import load_config, read_config_file


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_config_is_train_options_and_known_objectives(stage):
    options = read_config_file(RECIPE / f"{stage}.yaml")
    objectives = stage_objectives(options.pop("objectives"))
    assert isinstance(objectives[0], LumpedVocab)
    cfg = load_config(None, **options, model="m", data="d", output="o")
    assert cfg.stage == options["stage"]


def test_objectives_come_in_the_trainers_order_with_their_settings():
    spec = {"box_regression": {"weight": 0.5, "layer": 1}, "lumped_vocab": None,
            "box_attention": {"heads": [0, 2]}}  # fmt: skip
    lumped, attention, regression = stage_objectives(spec)
    assert isinstance(lumped, LumpedVocab)
    assert isinstance(attention, BoxAttention) and attention.heads == [0, 2]
    assert isinstance(regression, BoxRegression)
    assert (regression.weight, regression.layer) == (0.5, 1)
    assert stage_objectives({}) == []


def test_an_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="box_atention"):
        stage_objectives({"box_atention": {}})
