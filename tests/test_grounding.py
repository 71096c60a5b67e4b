"""Grounding text: parsing the model's boxes, formatting targets, pixel mapping, drawing."""

import io
import random

import pytest
from PIL import Image

from qwen2vl.grounding import (
    RELATIVE,
    Box,
    Frame,
    GroundedObject,
    Quad,
    draw_objects,
    format_box,
    format_grounding,
    format_json,
    format_object,
    frame_for,
    grounding_prompt,
    map_points,
    objects_in_pixels,
    parse_grounding,
    to_png,
)

REF = "<|object_ref_start|>{}<|object_ref_end|>"
BOX = "<|box_start|>{}<|box_end|>"


def test_parses_one_reference_with_its_box():
    text = "Here: " + REF.format("the cat") + BOX.format("(12,34),(560,780)") + "."
    assert parse_grounding(text) == [GroundedObject("the cat", [Box(12, 34, 560, 780)])]


def test_several_boxes_follow_one_reference():
    text = REF.format("dogs") + BOX.format("(1,2),(3,4)") + BOX.format("(5,6),(7,8)")
    text += ", " + BOX.format("(9,10),(11,12),(13,14),(15,16)")  # pairs in one body count too
    (obj,) = parse_grounding(text)
    assert obj.label == "dogs"
    assert obj.boxes == [Box(1, 2, 3, 4), Box(5, 6, 7, 8), Box(9, 10, 11, 12), Box(13, 14, 15, 16)]


def test_several_objects_and_boxes_without_reference():
    text = (
        BOX.format("(0,0),(10,10)")
        + " then "
        + REF.format("a")
        + BOX.format("(1,1),(2,2)")
        + " and "
        + REF.format("b")
        + BOX.format("( 3 , 3 ), ( 4 , 4 )")
        + " and loose "
        + BOX.format("(5,5),(6,6)")
    )
    objects = parse_grounding(text)
    assert [(o.label, o.boxes) for o in objects] == [
        (None, [Box(0, 0, 10, 10)]),
        ("a", [Box(1, 1, 2, 2)]),
        ("b", [Box(3, 3, 4, 4)]),
        (None, [Box(5, 5, 6, 6)]),
    ]


def test_parses_quads():
    text = REF.format("sign") + "<|quad_start|>(1,2),(30,2),(30,40),(1,40)<|quad_end|>"
    (obj,) = parse_grounding(text)
    assert obj.quads == [Quad(((1, 2), (30, 2), (30, 40), (1, 40)))] and obj.boxes == []


def test_malformed_shapes_are_skipped_and_refs_without_boxes_kept():
    text = REF.format("x") + BOX.format("(1,2),(3)") + BOX.format("nothing") + REF.format("y")
    text += "<|quad_start|>(1,2),(3,4)<|quad_end|>" + BOX.format("(1,2),(3,4),(5,6)")
    objects = parse_grounding(text)
    assert [(o.label, o.boxes, o.quads) for o in objects] == [("x", [], []), ("y", [], [])]
    assert parse_grounding("plain text, no boxes") == []


def test_format_then_parse_round_trips():
    rng = random.Random(0)
    objects = []
    for i in range(20):
        boxes = [Box(*(rng.randrange(1000) for _ in range(4))) for _ in range(rng.randint(1, 3))]
        quads = [Quad(tuple((rng.randrange(1000), rng.randrange(1000)) for _ in range(4)))]
        objects.append(GroundedObject(f"thing {i}", boxes, quads if i % 3 == 0 else []))
    assert parse_grounding(format_grounding(objects)) == objects
    assert format_box(Box(1, 2, 3, 4)) == "<|box_start|>(1,2),(3,4)<|box_end|>"
    assert format_object(GroundedObject(None, [Box(1, 2, 3, 4)])) == format_box(Box(1, 2, 3, 4))


def test_pixels_to_norm_to_pixels_within_one_pixel():
    # One unit is size/1000 px and rounding loses at most half a unit (a whole one at the
    # clamped far edge): within 1 px for images up to 1000 px, within one unit beyond.
    rng = random.Random(1)
    for _ in range(500):
        w, h = rng.randint(1, 4000), rng.randint(1, 4000)
        xs = sorted(rng.uniform(0, w) for _ in range(2))
        ys = sorted(rng.uniform(0, h) for _ in range(2))
        back = Box.from_pixels(xs[0], ys[0], xs[1], ys[1], w, h).to_pixels(w, h)
        for a, b, size in zip((xs[0], ys[0], xs[1], ys[1]), back, (w, h, w, h), strict=True):
            assert abs(a - b) <= max(1.0, size / 1000) + 1e-9, (a, b, size)


def test_to_pixels_uses_the_original_image_size():
    assert Box(100, 250, 500, 1000).to_pixels(640, 480) == (64.0, 120.0, 320.0, 480.0)
    assert Quad(((0, 0), (500, 0), (500, 500), (0, 500))).to_pixels(10, 20)[2] == (5.0, 10.0)


def test_from_pixels_clamps_into_range():
    assert Box.from_pixels(-5, -1, 700, 999, 640, 480) == Box(0, 0, 999, 999)


def test_grounding_prompt_is_plain_text():
    prompt = grounding_prompt("red car")
    assert "red car" in prompt and "<|" not in prompt


def test_draw_objects_marks_boxes_and_keeps_the_input():
    image = Image.new("RGB", (200, 100), "white")
    objects = [GroundedObject("cat", [Box(100, 200, 500, 800)]), GroundedObject(None, [])]
    objects.append(GroundedObject("sign", [], [Quad(((600, 100), (900, 100), (900, 900),
                                                       (600, 900)))]))  # fmt: skip
    drawn = draw_objects(image, objects)
    assert drawn.size == image.size and image.getpixel((20, 50)) == (255, 255, 255)
    assert drawn.getpixel((20, 50)) != (255, 255, 255)  # left edge of the cat box (x=20px)
    assert drawn.getpixel((150, 90)) != (255, 255, 255)  # bottom edge of the sign quad
    assert drawn.getpixel((60, 50)) == (255, 255, 255)  # inside the box: untouched


def test_to_png_gives_a_readable_png():
    image = draw_objects(Image.new("L", (32, 32)), [GroundedObject("x", [Box(0, 0, 999, 999)])])
    data = to_png(image)
    assert data.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(data)).size == (32, 32)


@pytest.mark.parametrize("label", ["", "a label with spaces", "中文"])
def test_labels_round_trip(label):
    obj = GroundedObject(label, [Box(1, 2, 3, 4)])
    assert parse_grounding(format_object(obj)) == [obj]


# -- Qwen2.5-VL: JSON boxes in pixels of the resized input ---------------------------------------

QWEN25_ANSWER = """Here they are:
```json
[
\t{"bbox_2d": [135, 114, 1016, 672], "label": "dog"},
\t{"bbox_2d": [10.6, 20, 30, 40.4], "label": "the cat"}
]
```"""


def test_parses_qwen25_json_boxes_as_separate_objects():
    assert parse_grounding(QWEN25_ANSWER) == [
        GroundedObject("dog", [Box(135, 114, 1016, 672)]),
        GroundedObject("the cat", [Box(11, 20, 30, 40)]),
    ]


def test_json_entries_that_are_not_boxes_are_skipped():
    text = '{"bbox_2d": [1, 2, 3], "label": "short"} {"bbox_2d": [1, 2, 3, true]} {"bbox_2d": oops}'
    text += ' {"bbox_2d": [1, 2, 3, 4]}'
    assert parse_grounding(text) == [GroundedObject(None, [Box(1, 2, 3, 4)])]


def test_json_and_markup_keep_their_order():
    text = '{"bbox_2d": [1, 2, 3, 4], "label": "a"} ' + REF.format("b") + BOX.format("(5,6),(7,8)")
    assert [o.label for o in parse_grounding(text)] == ["a", "b"]


def test_format_json_round_trips():
    objects = [GroundedObject("dog", [Box(1, 2, 3, 4)]), GroundedObject("中文", [Box(5, 6, 7, 8)])]
    text = format_json(objects)
    assert text.startswith("```json\n[") and text.endswith("]\n```")
    assert parse_grounding(text) == objects


def test_frames_map_each_family_onto_the_original_image():
    # A 1000x500 photo that smart_resize turned into 644x322 model pixels.
    assert frame_for("qwen2_vl", (644, 322)) is RELATIVE
    qwen25 = frame_for("qwen2_5_vl", (644, 322))
    assert Box(322, 161, 644, 322).to_pixels(1000, 500, qwen25) == (500.0, 250.0, 1000.0, 500.0)
    assert Box(500, 500, 1000, 1000).to_pixels(1000, 500) == (500.0, 250.0, 1000.0, 500.0)
    # The same numbers read in the wrong frame land elsewhere: the bug users report most.
    assert Box(322, 161, 644, 322).to_pixels(1000, 500) != (500.0, 250.0, 1000.0, 500.0)


def test_from_pixels_into_a_pixel_frame():
    frame = Frame(644, 322)
    assert Box.from_pixels(0, 0, 1000, 500, 1000, 500, frame) == Box(0, 0, 643, 321)
    assert Box.from_pixels(100, 50, 500, 250, 1000, 500, frame) == Box(64, 32, 322, 161)


def test_map_points_rewrites_markup_and_json_and_nothing_else():
    text = (
        "See (1,2) " + REF.format("a (3,4)") + BOX.format("(10,20),(30,40)")
        + '<|quad_start|>(1,1),(2,1),(2,2),(1,2)<|quad_end|>'
        + ' {"bbox_2d": [10, 20, 30, 40], "label": "b"} {"bbox_2d": [1, 2]}'
    )  # fmt: skip
    out = map_points(text, lambda x, y: (x * 2, y + 1))
    assert out.startswith("See (1,2) " + REF.format("a (3,4)") + BOX.format("(20,21),(60,41)"))
    assert "<|quad_start|>(2,2),(4,2),(4,3),(2,3)<|quad_end|>" in out
    assert '{"bbox_2d": [20, 21, 60, 41], "label": "b"}' in out
    assert out.endswith('{"bbox_2d": [1, 2]}')


def test_objects_in_pixels_is_plain_data():
    objects = parse_grounding(REF.format("cat") + BOX.format("(100,200),(500,1000)"))
    assert objects_in_pixels(objects, 640, 480) == [
        {"label": "cat", "boxes": [[64.0, 96.0, 320.0, 480.0]], "quads": []}
    ]
    assert objects_in_pixels(objects, 200, 100, Frame(100, 400))[0]["boxes"] == [
        [200.0, 50.0, 1000.0, 250.0]
    ]
