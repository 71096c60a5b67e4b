"""Dense labels line up with what the processor made of the scene: one label per merged token,
objects where they were drawn, characters in reading order."""

from __future__ import annotations

import numpy as np
import pytest

from qwen2vl.grounding import Box
from qwen2vl.synth import make_sample
from qwen2vl.synth.dataset import conversation
from qwen2vl.synth.labels import BOX_DIGITS, CHARS, HEADS, ITEM_HEADS, MAX_TEXT, scene_labels
from qwen2vl.synth.world import COLOURS, SHAPES


def labelled(processor, task, index=0):
    sample = make_sample(task, seed=3, index=index)
    visuals = processor.encode(conversation(sample, answer=False)).visuals
    grids = [v.grid_thw for v in visuals]
    return sample, grids, scene_labels(sample, grids, processor.media.merge_size)


@pytest.mark.parametrize("task", ["shape", "count", "ocr", "compare", "video_direction"])
def test_one_label_per_merged_token(processor, task):
    _, grids, labels = labelled(processor, task)
    assert len(labels) == len(grids)
    for (t, h, w), lab in zip(grids, labels, strict=True):
        n = t * (h // 2) * (w // 2)
        for name, classes in HEADS.items():
            assert lab.tokens[name].shape == (n,)
            assert -1 <= lab.tokens[name].min() and lab.tokens[name].max() < classes
            # box digits are labelled exactly on object tokens, characters on every token of an
            # OCR picture, everything else on every token
            labelled_on = True
            if name in BOX_DIGITS:
                labelled_on = lab.tokens["colour"] > 0
            elif name.startswith("char_"):
                labelled_on = task == "ocr"
            assert np.all((lab.tokens[name] >= 0) == labelled_on)
        assert lab.box.shape == (n, 4) and lab.where.shape == (n, 2)
        assert np.all((lab.where > 0) & (lab.where < 1))
        assert set(lab.item) == set(ITEM_HEADS)


def test_shape_labels_name_the_drawn_object_and_its_box(processor):
    for index in range(5):
        sample, _, (lab,) = labelled(processor, "shape", index)
        (shape,) = sample.shapes_of(0)
        on = lab.tokens["colour"] > 0
        assert on.any()
        assert set(lab.tokens["colour"][on]) == {list(COLOURS).index(shape.colour) + 1}
        assert set(lab.tokens["kind"][on]) == {SHAPES.index(shape.kind) + 1}
        width, height = sample.images[0].size
        x0, y0, x1, y1 = shape.corners
        assert np.allclose(lab.box[on], [x0 / width, y0 / height, x1 / width, y1 / height])
        # the digits the grounding answer writes for this object
        digits = [int(lab.tokens[f"{c}_hundreds"][on][0]) for c in ("x1", "y1", "x2", "y2")]
        box = Box.from_pixels(x0, y0, x1, y1, width, height)
        assert digits == [v // 100 for v in (box.x1, box.y1, box.x2, box.y2)]
        for name in BOX_DIGITS:
            assert len(set(lab.tokens[name][on])) == 1
        # the labelled cells sit inside the object's box
        assert np.all(lab.where[on, 0] > x0 / width - 0.25)
        assert np.all(lab.where[on, 0] < x1 / width + 0.25)
        assert lab.sets["colours"].sum() == 1 and lab.sets["kinds"].sum() == 1
        assert lab.item["count"] == 1 and lab.item["direction"] == -1
        assert lab.item["shape"] == SHAPES.index(shape.kind)


def test_the_item_shape_label_needs_exactly_one_object(processor):
    for index in range(8):
        sample, _, (lab,) = labelled(processor, "count", index)
        shapes = sample.shapes_of(0)
        want = SHAPES.index(shapes[0].kind) if len(shapes) == 1 else -1
        assert lab.item["shape"] == want
    sample, _, labels = labelled(processor, "video_direction")
    assert labels[-1].item["shape"] == SHAPES.index(sample.shapes[0].kind)


def test_ocr_labels_spell_the_text(processor):
    for index in range(5):
        sample, ((_, h, w),), (lab,) = labelled(processor, "ocr", index)
        text = str(sample.target)
        spelled = [CHARS[lab.item[f"text_{k}"] - 1] for k in range(len(text))]
        assert "".join(spelled) == text
        # the k-th character is labelled once, in the token holding its centre
        for k, char in enumerate(text):
            (where,) = np.nonzero(lab.tokens[f"char_{k}"])
            assert len(where) == 1 and CHARS[lab.tokens[f"char_{k}"][where[0]] - 1] == char
            x0, y0, x1, y1 = sample.glyphs[k][1]
            width, height = sample.images[0].size
            centre = np.array([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height])
            assert np.all(np.abs(lab.where[where[0]] - centre) <= [1 / w, 1 / h])  # half a cell
        for k in range(len(text), MAX_TEXT):
            assert not lab.tokens[f"char_{k}"].any()


def test_video_labels_carry_the_motion(processor):
    sample, grids, labels = labelled(processor, "video_direction")
    lab = labels[-1]
    assert grids[-1][0] == len(sample.video) // 2
    assert lab.item["direction"] >= 0 and lab.item["count"] == -1


def test_every_object_labels_a_cell_however_small(processor):
    # grounding draws objects from 12 pixels: one straddling four 28-pixel cells covers none of
    # them by COVERED, and must still label the cell it covers most, with its own box
    small = 0
    for index in range(40):
        sample, _, (lab,) = labelled(processor, "grounding", index)
        width, height = sample.images[0].size
        for shape in sample.shapes:
            x0, y0, x1, y1 = shape.corners
            corners = [x0 / width, y0 / height, x1 / width, y1 / height]
            mine = np.all(np.isclose(lab.box, corners), axis=1)
            on = mine & (lab.tokens["colour"] == list(COLOURS).index(shape.colour) + 1)
            assert on.any(), (index, shape)
            small += (x1 - x0) < 16
    assert small > 0  # the seed draws some objects under 16 pixels
