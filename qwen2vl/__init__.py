"""qwen2vl: a small, fast, correct Python implementation of Qwen2-VL and Qwen2.5-VL."""

from qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl.errors import (
    CheckpointError,
    ConfigError,
    MediaError,
    MessageError,
    Qwen2VLError,
    TokenizerError,
    ToolCallError,
)
from qwen2vl.generation import Completion, Pipeline, SamplingParams
from qwen2vl.generation.load import load_for_inference
from qwen2vl.media import (
    ImageSettings,
    MediaAccess,
    MediaConfig,
    VideoSettings,
    load_image,
    plan_image,
    plan_video,
    process_image,
    process_video,
    smart_resize,
)
from qwen2vl.model import Qwen2VL, Qwen2VLOutput
from qwen2vl.presets import PRESETS, preset
from qwen2vl.processor import Processor, load_processor
from qwen2vl.tokenizer import Tokenizer
from qwen2vl.weights import load_model, save_pretrained

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Completion",
    "ConfigError",
    "ImageSettings",
    "MediaAccess",
    "MediaConfig",
    "VideoSettings",
    "MediaError",
    "MessageError",
    "Pipeline",
    "Processor",
    "Qwen2VL",
    "Qwen2VLConfig",
    "Qwen2VLError",
    "Qwen2VLOutput",
    "SamplingParams",
    "TextConfig",
    "Tokenizer",
    "TokenizerError",
    "ToolCallError",
    "VisionConfig",
    "load_for_inference",
    "load_image",
    "load_model",
    "load_processor",
    "plan_image",
    "plan_video",
    "preset",
    "process_image",
    "process_video",
    "save_pretrained",
    "smart_resize",
]
