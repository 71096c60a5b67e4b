"""The metrics against hand-computed examples, the official scripts' edge cases included."""

from __future__ import annotations

import pytest

from qwen2vl.grounding import Box
from qwen2vl.metrics import (
    anls,
    box_hit,
    box_iou,
    choice_accuracy,
    choice_letter,
    exact_match,
    iou,
    levenshtein,
    vqa_accuracy,
    vqa_normalize,
)
from qwen2vl.tokenizer import BOX_END, BOX_START, OBJECT_REF_END, OBJECT_REF_START

# ---- exact match ------------------------------------------------------------------------------


def test_exact_match_ignores_whitespace_and_case_only():
    assert exact_match("  The  Red\nCircle ", ["the red circle"]) == 1.0
    assert exact_match("red circle.", ["red circle"]) == 0.0
    assert exact_match("blue", ["red", "Blue"]) == 1.0
    assert exact_match("red", "red") == 1.0  # a lone string is one reference


# ---- VQA --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("Yes.", "yes"),  # a final period goes
        ("a dog", "dog"),  # articles go
        ("The Dog", "dog"),
        ("two", "2"),  # number words up to ten become digits
        ("none", "0"),
        ("twenty two", "twenty 2"),  # ...word by word: this is not "22"
        ("dont", "don't"),  # contractions get their apostrophe
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # a comma inside a number goes
        ("yes/no", "yes no"),  # glued punctuation splits
        ("black & white", "black & white"),  # & is not punctuation to VQA
        ("hot dog!", "hot dog"),
        ("it's", "it's"),  # apostrophes stay
        ("  left\tside\n", "left side"),
    ],
)
def test_vqa_normalisation(answer, normalised):
    assert vqa_normalize(answer) == normalised


def test_vqa_accuracy_is_the_leave_one_out_mean_of_min_matches_over_3():
    humans = ["2"] * 3 + ["3"] * 7
    # leaving out a "2" leaves 2 others that said it (2/3), a "3" leaves 3 (1): (3 * 2/3 + 7) / 10
    assert vqa_accuracy("2", humans) == pytest.approx(0.9)
    assert vqa_accuracy("3", humans) == pytest.approx(1.0)  # 7 say it: 1 in every subset
    assert vqa_accuracy("4", humans) == 0.0
    two = ["cat", "cat"] + ["dog"] * 8
    assert vqa_accuracy("cat", two) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    four = ["cat"] * 4 + ["dog"] * 6
    assert vqa_accuracy("cat", four) == pytest.approx(1.0)  # 3 others always remain


def test_vqa_accuracy_normalises_both_sides():
    humans = ["2"] * 10
    assert vqa_accuracy("Two.", humans) == 1.0
    assert vqa_accuracy("twenty two", ["22"] * 10) == 0.0
    assert vqa_accuracy("A dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("yes.", ["Yes"] * 10) == 1.0


def test_vqa_accuracy_with_one_reference_is_a_normalised_match():
    assert vqa_accuracy("The cat.", ["cat"]) == 1.0
    assert vqa_accuracy("dog", ["cat"]) == 0.0


# ---- ANLS -------------------------------------------------------------------------------------


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls_exact_near_and_below_the_threshold():
    assert anls("hello", ["hello"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)  # 1 edit over 5 characters
    assert anls("abcd", ["ab"]) == 0.5  # distance exactly half: kept, as the DocVQA script does
    assert anls("abcde", ["abxyz"]) == 0.0  # 3/5 = 0.6 > 0.5: nothing
    assert anls("xyz", ["abc"]) == 0.0


def test_anls_is_case_and_space_insensitive_and_takes_the_best_reference():
    assert anls("HELLO  World", ["hello world"]) == 1.0
    assert anls("1O.5O", ["$10.50", "10.50"]) == pytest.approx(0.6)  # 2 edits over 5
    assert anls("10.50", ["$10.50", "10.50"]) == 1.0
    assert anls("", [""]) == 1.0


# ---- IoU --------------------------------------------------------------------------------------


def test_iou():
    a = Box(0, 0, 100, 100)
    assert iou(a, a) == 1.0
    assert iou(a, Box(50, 0, 150, 100)) == pytest.approx(50 / 150)
    assert iou(a, Box(100, 0, 200, 100)) == 0.0  # touching edges
    assert iou(a, Box(10, 10, 10, 50)) == 0.0  # degenerate


def marked(*boxes: tuple[int, int, int, int], label: str = "the dog") -> str:
    body = "".join(f"{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}" for x1, y1, x2, y2 in boxes)
    return f"{OBJECT_REF_START}{label}{OBJECT_REF_END}{body}"


def test_a_box_hits_at_iou_one_half_exactly_and_not_below():
    truth = [marked((0, 0, 100, 100))]
    assert box_iou(marked((0, 0, 100, 50)), truth) == 0.5  # half inside: 5000 / 10000
    assert box_hit(marked((0, 0, 100, 50)), truth) == 1.0
    assert box_hit(marked((0, 0, 100, 49)), truth) == 0.0
    assert box_hit("no box here", truth) == 0.0


def test_boxes_are_read_with_or_without_their_markup_and_the_first_counts():
    truth = ["(100,100),(300,300)"]  # a reference written plain
    assert box_hit(marked((100, 100, 300, 300)), truth) == 1.0
    assert box_hit("The dog is at (100,100),(300,300).", truth) == 1.0
    assert box_hit(marked((600, 600, 700, 700), (100, 100, 300, 300)), truth) == 0.0
    assert box_hit(marked((100, 100, 300, 300)), [marked((0, 0, 9, 9)), truth[0]]) == 1.0


# ---- multiple choice --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("B", "B"),
        ("b", "B"),
        ("B.", "B"),
        ("(C)", "C"),
        ("b) cat", "B"),
        ("D. The red one", "D"),
        ("The answer is (B)", "B"),
        ("The answer is (b).", "B"),
        ("Answer: C", "C"),
        ("The correct answer is D, the dog.", "D"),
        ("I think option A is right", "A"),
        ("**C**", "C"),
        ("I'd say B", "B"),
        ("A cat", None),  # an article, not an option
        ("The answer is a cat", None),
        ("It could be B or C", None),  # two letters: no single pick
        ("", None),
    ],
)
def test_choice_letter(reply, letter):
    assert choice_letter(reply) == letter


def test_choice_by_option_text_and_reference_forms():
    options = ["cat", "dog", "cow"]
    assert choice_letter("dog", options) == "B"
    assert choice_letter("Dog.", {"A": "cat", "B": "dog"}) == "B"
    assert choice_letter("horse", options) is None
    assert choice_accuracy("The answer is (B)", ["(B) dog"]) == 1.0
    assert choice_accuracy("cow", ["C"], options) == 1.0
    assert choice_accuracy("A", ["B"]) == 0.0
    assert choice_accuracy("no idea", ["B"]) == 0.0
