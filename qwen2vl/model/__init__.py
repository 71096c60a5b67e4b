"""Plain PyTorch modules of Qwen2-VL; imports only torch and qwen2vl.config."""

from qwen2vl.model.qwen2vl import Qwen2VL, Qwen2VLOutput
from qwen2vl.model.text import DecoderTaps

__all__ = ["DecoderTaps", "Qwen2VL", "Qwen2VLOutput"]
