"""Each synthetic task's answer agrees with what was drawn."""

from __future__ import annotations

import numpy as np
import pytest

from qwen2vl.grounding import parse_grounding
from qwen2vl.synth import (
    ALL_TASKS,
    TASKS,
    make_compare,
    make_count,
    make_grounding,
    make_ocr,
    make_shape,
    make_video_bounces,
    make_video_direction,
)
from qwen2vl.synth.dataset import conversation
from qwen2vl.synth.tasks import MAX_BOUNCES, MAX_COUNT, WORDS, bounce_track
from qwen2vl.synth.world import CELL, COLOURS, SHADE, SHAPES, canvas

N = 24


def samples(make, n: int = N):
    return [make(np.random.default_rng(i)) for i in range(n)]


def drawn(image) -> np.ndarray:
    """[H, W] bool: pixels that differ from the blank canvas. Its grey is read from the top-left
    pixel, where neither ramp has risen (still background in every still image: objects keep a
    one-pixel gap, text a margin)."""
    rgb = np.asarray(image)
    grey = int(rgb[0, 0, 2])
    assert rgb[0, 0].tolist() == [grey] * 3
    return (rgb != np.asarray(canvas(image.width, image.height, grey))).any(-1)


def components(image) -> int:
    """Connected (8-neighbour) regions of drawn pixels."""
    todo = drawn(image)
    h, w = todo.shape
    count = 0
    for y, x in zip(*np.nonzero(todo), strict=True):
        if not todo[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        todo[y, x] = False
        while stack:
            cy, cx = stack.pop()
            for ny in range(max(cy - 1, 0), min(cy + 2, h)):
                for nx in range(max(cx - 1, 0), min(cx + 2, w)):
                    if todo[ny, nx]:
                        todo[ny, nx] = False
                        stack.append((ny, nx))
    return count


@pytest.mark.parametrize("task", ALL_TASKS)
def test_same_generator_state_gives_the_same_sample(task):
    a, b = TASKS[task](np.random.default_rng(7)), TASKS[task](np.random.default_rng(7))
    assert (a.question, a.answer, a.target, a.box, a.shapes) == (
        b.question, b.answer, b.target, b.box, b.shapes,
    )  # fmt: skip
    for x, y in zip(a.images + (a.video or []), b.images + (b.video or []), strict=True):
        assert x.tobytes() == y.tobytes()


def test_count_answer_is_the_number_of_drawn_objects():
    seen = set()
    for s in samples(make_count, 40):
        (image,) = s.images
        assert s.answer == str(s.target) and s.target == len(s.shapes)
        assert components(image) == s.target
        seen.add(s.target)
    assert seen == set(range(1, MAX_COUNT + 1))


def test_grounding_answer_parses_back_to_the_stored_box_around_the_object():
    for s in samples(make_grounding):
        (obj,) = parse_grounding(s.answer)
        assert obj.label == s.target and obj.boxes == [s.box]
        (image,) = s.images
        (shape,) = [sh for sh in s.shapes if sh.label == s.target]
        pixels = s.box.to_pixels(*image.size)
        assert np.allclose(pixels, shape.corners, atol=max(image.size) / 1000 + 0.5)


def test_object_boxes_are_pixel_tight_for_every_kind():
    kinds = set()
    for s in samples(make_shape, 60):
        ys, xs = np.nonzero(drawn(s.images[0]))
        (shape,) = s.shapes
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == shape.corners
        assert s.target == shape.label and s.answer.endswith(f" {shape.label}.")
        kinds.add(shape.kind)
    assert kinds == set(SHAPES)


def test_shape_labels_in_a_grounding_image_are_unique():
    for s in samples(make_grounding):
        labels = [sh.label for sh in s.shapes]
        assert len(set(labels)) == len(labels)


def test_compare_answer_follows_the_two_objects():
    answers = set()
    for s in samples(make_compare, 40):
        a, b = s.shapes
        attribute = "kind" if s.question.endswith("shape?") else "colour"
        same = getattr(a, attribute) == getattr(b, attribute)
        assert s.target == ("yes" if same else "no") and len(s.images) == 2
        answers.add(s.target)
    assert answers == {"yes", "no"}


def test_ocr_text_is_a_number_or_a_known_word_drawn_in_a_palette_colour():
    for s in samples(make_ocr):
        assert s.answer == s.target and (s.target.isdigit() or s.target in WORDS)
        (image,) = s.images
        colours = {tuple(c) for c in np.asarray(image)[drawn(image)]}
        assert len(colours) == 1 and colours <= set(COLOURS.values())


def test_ocr_puts_one_character_in_each_token_cell(processor):
    for s in samples(make_ocr, 60):
        (image,) = s.images
        assert image.width % CELL == 0 and image.height % CELL == 0
        (visual,) = processor.encode(conversation(s, answer=False)).visuals
        assert visual.grid_thw == (1, image.height // 14, image.width // 14)  # size kept
        assert [c for c, _ in s.glyphs] == list(s.target)
        ink = drawn(image)
        cells = []
        for char, (x0, y0, x1, y1) in s.glyphs:
            cells.append((x0 // CELL, y0 // CELL))
            assert cells[-1] == ((x1 - 1) // CELL, (y1 - 1) // CELL), char  # inside one cell
            assert ink[y0:y1, x0:x1].any()
        (col, row), n = cells[0], len(cells)
        assert cells == [(col + k, row) for k in range(n)]  # a line, left to right
        inside = sum(int(ink[y0:y1, x0:x1].sum()) for _, (x0, y0, x1, y1) in s.glyphs)
        assert int(ink.sum()) == inside  # nothing drawn outside the glyphs


def test_video_direction_answer_matches_the_motion():
    for s in samples(make_video_direction):
        xs = np.array([sh.x0 for sh in s.shapes])
        ys = np.array([sh.y0 for sh in s.shapes])
        axis, sign = {"left": (xs, -1), "right": (xs, 1), "up": (ys, -1), "down": (ys, 1)}[s.target]
        assert (sign * np.diff(axis) >= 0).all() and sign * (axis[-1] - axis[0]) > 0
        assert len(s.video) == len(s.shapes) and len(s.video) % 2 == 0
        assert len({f.size for f in s.video}) == 1


def test_bounce_count_is_the_number_of_turns_in_the_drawn_track():
    seen = set()
    for s in samples(make_video_bounces, 40):
        xs = [sh.x0 for sh in s.shapes]
        ys = [sh.y0 for sh in s.shapes]
        track = np.array(xs if len(set(xs)) > 1 else ys)
        steps = np.sign(np.diff(track))
        steps = steps[steps != 0]
        assert int((steps[1:] != steps[:-1]).sum()) == s.target == int(s.answer)
        w, h = s.video[0].size
        assert all(0 <= sh.x0 and sh.x1 < w and 0 <= sh.y0 and sh.y1 < h for sh in s.shapes)
        seen.add(s.target)
    assert seen == set(range(MAX_BOUNCES + 1))


def test_bounce_track_reflects_off_both_ends():
    assert bounce_track(8, 3, 10, 4) == ([8, 9, 6, 3], 1)
    assert bounce_track(1, -3, 10, 3) == ([1, 2, 5], 1)


def test_canvas_ramps_give_every_pixel_its_place():
    rgb = np.asarray(canvas(60, 90, grey=20)).astype(int)
    assert rgb[0, 0].tolist() == [20, 20, 20] and rgb[-1, -1].tolist() == [20 + SHADE] * 2 + [20]
    assert (rgb[:, :, 2] == 20).all()
    assert (np.diff(rgb[:, :, 0], axis=1) >= 0).all() and (np.diff(rgb[:, :, 0], axis=0) == 0).all()
    assert (np.diff(rgb[:, :, 1], axis=0) >= 0).all() and (np.diff(rgb[:, :, 1], axis=1) == 0).all()
    # two pixels a fifth of the canvas apart always differ
    assert (rgb[:, 12:, 0] > rgb[:, :-12, 0]).all() and (rgb[18:, :, 1] > rgb[:-18, :, 1]).all()


def test_images_come_in_varied_sizes_and_aspect_ratios():
    sizes = [im.size for task in ("shape", "count", "grounding") for s in samples(TASKS[task])
             for im in s.images]  # fmt: skip
    assert len(set(sizes)) > len(sizes) // 2
    assert any(w > 1.5 * h for w, h in sizes) and any(h > 1.5 * w for w, h in sizes)
    assert min(min(s) for s in sizes) >= 56 and max(max(s) for s in sizes) <= 112
