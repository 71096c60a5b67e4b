"""qwen2vl: a small, fast, correct Python implementation of Qwen2-VL."""

from qwen2vl.config import PRESETS, Qwen2VLConfig, TextConfig, VisionConfig, preset
from qwen2vl.errors import (
    CheckpointError,
    ConfigError,
    MediaError,
    MessageError,
    Qwen2VLError,
    TokenizerError,
    ToolCallError,
)
from qwen2vl.model import Qwen2VL, Qwen2VLOutput
from qwen2vl.weights import load_model, save_pretrained

__all__ = [
    "PRESETS",
    "Qwen2VL",
    "Qwen2VLConfig",
    "Qwen2VLOutput",
    "TextConfig",
    "VisionConfig",
    "load_model",
    "preset",
    "save_pretrained",
    "CheckpointError",
    "ConfigError",
    "MediaError",
    "MessageError",
    "Qwen2VLError",
    "TokenizerError",
    "ToolCallError",
]
