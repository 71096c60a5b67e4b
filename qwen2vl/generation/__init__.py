"""Generation: static KV cache, sampling, the batch generator, int8, and the chat Pipeline."""

from qwen2vl.generation.pipeline import Completion, Pipeline
from qwen2vl.generation.sampling import SamplingParams

__all__ = ["Completion", "Pipeline", "SamplingParams"]
