"""The synthetic visual world the default model is trained and evaluated on."""

from qwen2vl.synth.dataset import generate_dataset, make_sample, record
from qwen2vl.synth.tasks import (
    ALL_TASKS,
    TASKS,
    Sample,
    make_compare,
    make_count,
    make_grounding,
    make_ocr,
    make_shape,
    make_video_bounces,
    make_video_direction,
)

__all__ = [
    "ALL_TASKS",
    "TASKS",
    "Sample",
    "generate_dataset",
    "make_compare",
    "make_count",
    "make_grounding",
    "make_ocr",
    "make_sample",
    "make_shape",
    "make_video_bounces",
    "make_video_direction",
    "record",
]
