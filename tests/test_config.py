import json

import pytest

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import ConfigError
from qwen2vl.presets import preset

# The Qwen/Qwen2-VL-2B-Instruct config.json as released (flat style).
OFFICIAL_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


def nested(flat):
    """The transformers-5 style of the same config."""
    text = {
        k: v
        for k, v in flat.items()
        if k not in ("vision_config", "rope_scaling", "rope_theta", "model_type")
    }
    text["rope_parameters"] = {
        "rope_type": "default",
        "mrope_section": [16, 24, 24],
        "rope_theta": flat["rope_theta"],
    }
    vision = dict(flat["vision_config"])
    vision["in_channels"] = vision.pop("in_chans")
    return {
        "model_type": "qwen2_vl",
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": True,
        "image_token_id": 151655,
        "video_token_id": 151656,
    }


def test_official_flat_config_equals_preset():
    assert Qwen2VLConfig.from_hf(OFFICIAL_2B) == preset("2B")


def test_nested_transformers5_config_equals_preset():
    assert Qwen2VLConfig.from_hf(nested(OFFICIAL_2B)) == preset("2B")


def test_to_hf_round_trips():
    for name in ("2B", "7B", "72B"):
        cfg = preset(name)
        assert Qwen2VLConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "llava"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"hidden_size": 1000}, "hidden_size"),
        ({"rope_scaling": {"type": "yarn", "mrope_section": [16, 24, 24]}}, "rope_scaling.type"),
        ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}}, "mrope_section"),
        ({"rope_scaling": {"type": "mrope"}}, "mrope_section"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"vocab_size": 1000}, "image_token_id"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_hidden_layers": "28"}, "num_hidden_layers"),
    ],
)
def test_bad_values_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        Qwen2VLConfig.from_hf(OFFICIAL_2B | change)


def test_bad_vision_values_name_the_field():
    for change, field in (
        ({"num_heads": 7}, "num_heads"),
        ({"hidden_size": 64}, "hidden_size"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ):
        cfg = OFFICIAL_2B | {"vision_config": OFFICIAL_2B["vision_config"] | change}
        with pytest.raises(ConfigError, match=field):
            Qwen2VLConfig.from_hf(cfg)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="3B"):
        preset("3B")


# The Qwen/Qwen2.5-VL-7B-Instruct config.json as released (flat style).
OFFICIAL_25_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


def nested25(flat):
    """The transformers-5 style of a Qwen2.5-VL config."""
    out = nested(flat) | {"model_type": "qwen2_5_vl", "tie_word_embeddings": False}
    vision = dict(flat["vision_config"])
    vision["in_channels"] = vision.pop("in_chans")
    vision["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "axial"}
    vision["model_type"] = "qwen2_5_vl_vision"
    return out | {"vision_config": vision}


def test_qwen25_official_flat_config_equals_preset():
    cfg = Qwen2VLConfig.from_hf(OFFICIAL_25_7B)
    assert cfg == preset("2.5-7B")
    v = cfg.vision
    assert (v.embed_dim, v.hidden_size, v.mlp_dim) == (1280, 3584, 3420)
    assert (v.window_units, v.tokens_per_second, v.norm, v.mlp) == (4, 2, "rmsnorm", "gated")


def test_qwen25_nested_transformers5_config_equals_preset():
    assert Qwen2VLConfig.from_hf(nested25(OFFICIAL_25_7B)) == preset("2.5-7B")


def test_qwen25_to_hf_round_trips_and_keeps_the_family():
    for name in ("2.5-3B", "2.5-7B", "2.5-32B", "2.5-72B"):
        cfg = preset(name)
        hf = json.loads(json.dumps(cfg.to_hf()))
        assert hf["model_type"] == "qwen2_5_vl" and hf["vision_config"]["hidden_size"] == 1280
        assert Qwen2VLConfig.from_hf(hf) == cfg
    assert preset("2.5-7B").to_hf()["vision_config"] | {"in_channels": 3} == OFFICIAL_25_7B[
        "vision_config"
    ] | {"in_channels": 3}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"window_size": 100}, "window_size"),
        ({"fullatt_block_indexes": [7, 32]}, "fullatt_block_indexes"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"tokens_per_second": 0}, "tokens_per_second"),
        ({"out_hidden_size": 64}, "hidden_size"),
    ],
)
def test_qwen25_bad_vision_values_name_the_field(change, field):
    cfg = OFFICIAL_25_7B | {"vision_config": OFFICIAL_25_7B["vision_config"] | change}
    with pytest.raises(ConfigError, match=field):
        Qwen2VLConfig.from_hf(cfg)


def test_a_family_describes_only_its_own_vit():
    from dataclasses import replace

    qwen2, qwen25 = preset("7B"), preset("2.5-7B")
    with pytest.raises(ConfigError, match="norm='rmsnorm' does not fit model_type='qwen2_vl'"):
        replace(qwen2, vision=qwen25.vision)
    with pytest.raises(ConfigError, match="does not fit model_type='qwen2_5_vl'"):
        replace(qwen25, vision=qwen2.vision)
