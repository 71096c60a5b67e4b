"""Answer metrics as the benchmarks define them: pure functions of a reply and its references.

    exact_match(reply, refs)   1 if the reply equals a reference, whitespace and case aside
    vqa_accuracy(reply, refs)  VQA accuracy: min(#humans who gave the answer / 3, 1), averaged
                               over the 10-choose-9 subsets of the (10) human answers
    anls(reply, refs)          DocVQA's Average Normalized Levenshtein Similarity (threshold 0.5)
    iou(a, b), box_hit(...)    grounding: IoU of boxes in one frame (the numbers as written), a
                               hit at IoU >= 0.5
    choice_letter(reply)       the option letter of a multiple-choice reply ("The answer is (B)")

Each scorer returns a float in [0, 1]; a data set's score is their mean. The VQA normalisation and
ANLS follow the official scripts (GT-Vision-Lab/VQA `vqaEval.py`, the RRC DocVQA evaluation),
their quirks included, so numbers compare with published ones; where we differ it says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from qwen2vl.grounding import Box, parse_box_body, parse_grounding

IOU_HIT = 0.5
ANLS_THRESHOLD = 0.5

# ---- exact match ------------------------------------------------------------------------------


def _listed(references: str | Sequence[str]) -> list[str]:
    """A lone reference string is one reference, not a sequence of characters."""
    return [references] if isinstance(references, str) else list(references)


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split()).casefold()


def exact_match(reply: str, references: str | Sequence[str]) -> float:
    said = normalize_whitespace(reply)
    return float(any(said == normalize_whitespace(r) for r in _listed(references)))


# ---- VQA accuracy -----------------------------------------------------------------------------

# vqaEval.py's tables. "Im", "Ive", "Id've" never match (words are lower-cased first) and
# "somebody'd" maps the wrong way round: kept, as the published numbers were made with them.
_CONTRACTIONS = dict(
    pair.split(":", 1)
    for pair in """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
    hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
    howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't
    itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
    mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
    neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
    'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's
    shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've
    somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've
    somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
    someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
    somethingd've:something'd've something'dve:something'd've somethingll:something'll
    thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're
    theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll
    theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've
    weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've
    whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've
    who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's
    wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've
    yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've
    y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll
    youre:you're youve:you've
    """.split()
)
# Only these number words become digits: "twenty two" stays words and does not match "22".
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!")  # fmt: skip
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# Meant as "a period not between digits"; the look-behind is mistyped in the original
# ("(?!<=" is a look-ahead), so it is "a period not followed by a digit". Kept as published.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def vqa_normalize(answer: str) -> str:
    """vqaEval.py's processPunctuation then processDigitArticle (lower case, number words to
    digits, articles dropped, contractions given their apostrophe)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:  # glued punctuation ("yes/no") splits words; spaced or in 1,000 it goes
        spaced = p + " " in text or " " + p in text
        out = out.replace(p, "" if spaced or _COMMA_IN_NUMBER.search(text) else " ")
    out = _PERIOD.sub("", out, count=32)  # the original passes re.UNICODE (32) as the count
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(reply: str, references: str | Sequence[str]) -> float:
    """The mean over leaving each human answer out of min(#others that equal the reply / 3, 1).

    Unlike vqaEval.py, references are normalised as fully as the reply (the script relies on the
    published annotations being normalised already; a user's own references may not be), which
    gives the script's result on the published annotations."""
    said = vqa_normalize(reply)
    same = [vqa_normalize(r) == said for r in _listed(references)]
    if len(same) <= 1:
        return float(any(same))
    matches = sum(same)
    return sum(min(1.0, (matches - s) / 3) for s in same) / len(same)


# ---- ANLS -------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), two rows at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(reply: str, references: str | Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """1 - the smallest normalised edit distance to a reference, or 0 when that is under
    ``threshold``. Compared lower-cased with whitespace collapsed; the distance is divided by the
    longer raw string's length, as the DocVQA script does (an exact 0.5 counts, as there)."""
    said = " ".join(reply.strip().lower().split())
    distances = []
    for ref in _listed(references):
        length = max(len(ref.upper()), len(reply.upper()))
        dist = levenshtein(" ".join(ref.strip().lower().split()), said)
        distances.append(0.0 if length == 0 else dist / length)
    if not distances:
        return 0.0
    score = 1 - min(distances)
    return 0.0 if score < threshold else score


# ---- grounding --------------------------------------------------------------------------------


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (degenerate boxes have IoU 0)."""
    w = min(a.x2, b.x2) - max(a.x1, b.x1)
    h = min(a.y2, b.y2) - max(a.y1, b.y1)
    inter = max(0, w) * max(0, h)
    area = lambda r: max(0, r.x2 - r.x1) * max(0, r.y2 - r.y1)  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def boxes_in(text: str) -> list[Box]:
    """The boxes of a reply or reference: grounding markup (`<|box_start|>(x1,y1),(x2,y2)
    <|box_end|>`) or Qwen2.5-VL's `{"bbox_2d": [...]}` entries, else bare `(x1,y1),(x2,y2)`
    pairs, as a reply decoded without its special tokens reads."""
    marked = [box for obj in parse_grounding(text) for box in obj.boxes]
    return marked or parse_box_body(text)


def box_iou(reply: str, references: str | Sequence[str]) -> float:
    """IoU of the reply's first box with the closest reference box (0 without boxes)."""
    said = boxes_in(reply)
    truth = [box for ref in _listed(references) for box in boxes_in(ref)]
    if not said or not truth:
        return 0.0
    return max(iou(said[0], box) for box in truth)


def box_hit(reply: str, references: str | Sequence[str], threshold: float = IOU_HIT) -> float:
    return float(box_iou(reply, references) >= threshold)


# ---- multiple choice --------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"
_L = f"[{LETTERS}{LETTERS.lower()}]"
_CHOICE_PATTERNS = (
    re.compile(rf"^\W*({_L})\W*$"),  # "B", "(b)", "B."
    re.compile(rf"^\W*({_L})[.):]"),  # "b) cat", "B. cat", "C: cat"
    re.compile(rf"\(({_L})\)"),  # "The answer is (b)", "so (C) is right"
    # Capitals only from here: "the answer is a cat" names no option.
    re.compile(rf"[Aa]nswer\W+(?:is\W+)?(?:[Oo]ption\W+)?([{LETTERS}])\b"),
    re.compile(rf"(?:[Oo]ption|[Cc]hoice)\s+([{LETTERS}])\b"),
)
_LONE_LETTER = re.compile(rf"\b([{LETTERS}])\b")
_WORD_LETTER = re.compile(r"[AI](\s+[a-z]|')")  # "A cat", "I think", "I'd": words


def choice_letter(
    reply: str, options: Sequence[str] | Mapping[str, str] | None = None
) -> str | None:
    """The option letter a reply picks, upper case, or None when it names none or several.

    Tried in order: the reply is a letter; it starts with one and a delimiter ("b) cat"); a
    letter in parentheses ("the answer is (B)"); "the answer is C", "option C"; one capital
    letter standing alone; and, given the ``options`` (texts in letter order, or letter ->
    text), a reply that is an option's text."""
    text = reply.strip()
    for pattern in _CHOICE_PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1).upper()
    lone = {m[1] for m in _LONE_LETTER.finditer(text) if not _WORD_LETTER.match(text, m.start())}
    if len(lone) == 1:
        return lone.pop()
    if options:
        named = (
            options if isinstance(options, Mapping) else dict(zip(LETTERS, options, strict=False))
        )
        said = normalize_whitespace(text).rstrip(".")
        hits = [k.upper() for k, v in named.items() if normalize_whitespace(v) == said]
        return hits[0] if len(hits) == 1 else None
    return None


def choice_accuracy(
    reply: str,
    references: str | Sequence[str],
    options: Sequence[str] | Mapping[str, str] | None = None,
) -> float:
    """1 when the reply's letter is a reference's (references may be "B" or "(B) cat")."""
    said = choice_letter(reply, options)
    return float(
        said is not None and said in {choice_letter(r, options) for r in _listed(references)}
    )
