"""The default model's recipe, in one place: the synthetic visual world it is trained and
evaluated on, and how it is built.

    world, tasks, dataset   seeded scenes, questions and answers; JSONL + PNG data sets
    labels, pretrain        dense labels of a scene; vision pretraining of the ViT on them
    vocab, box_attention, box_regression
                            the recipe's training objectives (qwen2vl.train.objective)
    recipe/                 the architecture and the stage configs
    build, package          the build script (`qwen2vl build-default-model`) and its last step
    eval, demo              held-out scores; one scene per task
    NOTES.md, model_card.md what was measured; what users read beside the weights
"""

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
