"""`qwen2vl demo`: the whole system on the default model, in a few seconds.

It draws a fresh scene for each task of the synthetic world (seeded: the same scenes every run),
writes the media to the output directory (PNG images; a video as its PNG frames plus a GIF to
look at), asks the model about each through the same message schema users send, prints the
questions, answers and whether they are right, and saves the grounding answers drawn over their
image. The model reads the written files, so the demo exercises file loading, dynamic
resolution, video frames, the chat template, the vision tower and generation end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from qwen2vl.grounding import (
    Box,
    GroundedObject,
    draw_objects,
    format_object,
    grounding_prompt,
    parse_grounding,
)
from qwen2vl.synth.dataset import conversation, make_sample
from qwen2vl.synth.eval import MAX_NEW_TOKENS, SCORERS
from qwen2vl.synth.tasks import ALL_TASKS, VIDEO_FPS, Sample

DEMO_SEED = 7  # scenes no training or eval run draws (those use other seeds)
GROUNDING_PICTURE = "grounding.png"
PICTURE_SCALE = 4  # the scenes are 56..112 px: drawn boxes and labels need room


@dataclass
class DemoAnswer:
    task: str
    question: str
    media: list[Path]
    reply: str  # the model's text, special tokens kept
    expected: str
    correct: bool


def run_demo(
    pipeline,
    out_dir: str | Path,
    *,
    seed: int = DEMO_SEED,
    show: Callable[[DemoAnswer], None] | None = None,
) -> tuple[list[DemoAnswer], Path]:
    """Ask about one scene of every task (the grounding scene once per object); returns the
    answers and the path of the grounding picture. `show` is called after each answer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    answers = []
    for task in ALL_TASKS:
        sample = make_sample(task, seed=seed, index=0)
        for question in _questions(sample):
            answer = _ask(pipeline, question, out)
            answers.append(answer)
            if show is not None:
                show(answer)
    picture = _grounding_picture(answers, out)
    return answers, picture


def _questions(sample: Sample) -> list[Sample]:
    """The sample itself, or for the grounding scene one question per object in it."""
    if sample.task != "grounding":
        return [sample]
    out = []
    for shape in sample.shapes:
        box = Box.from_pixels(*shape.corners, *sample.images[0].size)
        answer = format_object(GroundedObject(shape.label, [box]))
        out.append(
            Sample(
                "grounding", grounding_prompt(shape.label), answer, shape.label,
                sample.images, box=box, shapes=[shape],
            )
        )  # fmt: skip
    return out


def _ask(pipeline, sample: Sample, out: Path) -> DemoAnswer:
    images, frames = _write_media(sample, out)
    messages = conversation(sample, images=[str(p) for p in images],
                            frames=None if frames is None else [str(p) for p in frames],
                            answer=False)  # fmt: skip
    completion = pipeline.complete(messages, max_new_tokens=MAX_NEW_TOKENS)
    stops = set(pipeline.stop_token_ids)
    ids = [t for t in completion.token_ids if t not in stops]
    reply = pipeline.processor.decode(ids, skip_special_tokens=False)
    media = images + ([frames[0].parent.with_suffix(".gif")] if frames else [])
    # a grounding answer is right by its box (IoU >= 0.5), so show the box it should have
    expected = sample.answer if sample.task == "grounding" else str(sample.target)
    return DemoAnswer(
        sample.task, sample.question, media, reply, expected, SCORERS[sample.task](sample, reply)
    )


def _write_media(sample: Sample, out: Path) -> tuple[list[Path], list[Path] | None]:
    images = []
    for j, image in enumerate(sample.images):
        images.append(out / f"{sample.task}_{j}.png")
        image.save(images[-1])
    if sample.video is None:
        return images, None
    folder = out / sample.task
    folder.mkdir(exist_ok=True)
    frames = []
    for k, frame in enumerate(sample.video):
        frames.append(folder / f"{k:02d}.png")
        frame.save(frames[-1])
    first, *rest = sample.video
    first.save(folder.with_suffix(".gif"), save_all=True, append_images=rest,
               duration=int(1000 / VIDEO_FPS), loop=0)  # fmt: skip
    return images, frames


def _grounding_picture(answers: list[DemoAnswer], out: Path) -> Path:
    """The grounding scene, enlarged, with every box the model answered drawn and labelled."""
    grounded = [a for a in answers if a.task == "grounding"]
    image = Image.open(grounded[0].media[0]).convert("RGB")
    big = image.resize((image.width * PICTURE_SCALE, image.height * PICTURE_SCALE),
                       Image.Resampling.NEAREST)  # fmt: skip
    objects: list[GroundedObject] = [o for a in grounded for o in parse_grounding(a.reply)]
    path = out / GROUNDING_PICTURE
    draw_objects(big, objects, line_width=2).save(path)
    return path


def format_answer(a: DemoAnswer) -> str:
    mark = "right" if a.correct else f"wrong, expected {a.expected}"
    media = ", ".join(p.name for p in a.media)
    return f"[{a.task}] {media}\n  Q: {a.question}\n  A: {a.reply}   ({mark})"
