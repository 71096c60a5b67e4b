"""Plain PyTorch modules of Qwen2-VL; imports only torch and qwen2vl.config."""

from qwen2vl.model.qwen2vl import Qwen2VL, Qwen2VLOutput

__all__ = ["Qwen2VL", "Qwen2VLOutput"]
