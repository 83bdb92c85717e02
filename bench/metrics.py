"""Per-item scoring functions for the benchmark suites.

Stdlib only, so suite hooks can import this without pulling in the lm-eval
or evaluation stacks; each function scores ONE item and returns a float in
[0, 1], leaving aggregation (usually the mean) to the caller.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

__all__ = ["anls", "vqa_accuracy", "relaxed_accuracy", "levenshtein", "METRICS"]


def _as_list(answers: Sequence[str] | str) -> list[str]:
    # A bare string is one answer, not a sequence of one-character answers.
    return [answers] if isinstance(answers, str) else list(answers)


# --------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
    """Edit distance; hand-rolled to stay dependency-free (answers are short)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_norm(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str] | str, threshold: float = 0.5) -> float:
    """DocVQA ANLS for one item, as the official evaluation code computes it.

    Two details of that code differ from the paper's formula and move scores (one wrong character of a
    2-character answer lands exactly on NL = 0.5): the edit distance is taken between the lower-cased,
    whitespace-collapsed strings but divided by the longer of the RAW strings (``len(s.upper())``,
    verbatim: upper-casing can lengthen a string, e.g. ``ß``), and the item score ``1 - min(NL)`` is
    zeroed only when it is *below* the threshold, so NL = 0.5 scores 0.5.
    """
    det = _anls_norm(prediction)
    values = []
    for answer in _as_list(answers):
        dist = levenshtein(_anls_norm(answer), det)
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else dist / length)
    if not values:
        return 0.0
    score = 1.0 - min(values)
    return 0.0 if score < threshold else score


# --------------------------------------------------------------------- VQA accuracy
# Tables and regexes copied from the official VQA evaluation (vqaEval.py), so
# scores are comparable with published VQAv2 / TextVQA numbers.

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# Official regex kept verbatim: "(?!<=" is a typo for a lookbehind, so in
# practice it strips every period not followed by a digit ("3.5" survives).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip


def _process_punctuation(text: str) -> str:
    # Official quirk: a digit-comma-digit anywhere means punctuation is deleted
    # rather than spaced out, so "1,000" becomes "1000", not "1 000".
    delete_all = _COMMA_STRIP.search(text) is not None
    out = text
    for p in _PUNCT:
        if delete_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """EvalAI answer normalization, so trivial surface forms don't cost accuracy."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str] | str) -> float:
    """VQAv2 / TextVQA accuracy for one item.

    With n >= 2 human answers this is the official score: the mean over the n
    leave-one-out subsets of min(1, matches / 3), which averages out the
    "3 of 10 annotators agree" rule's dependence on any single annotator.

    With exactly one answer the leave-one-out subset would be empty, so we use
    the common convention for generated data with a single reference:
    1.0 if the normalized prediction equals the normalized answer, else 0.0.
    Both sides are fully normalized (the official script only punctuation-
    normalizes the ground truth), so e.g. "two" and "2" match either way round.
    """
    gts = [normalize_vqa_answer(a) for a in _as_list(answers)]
    if not gts:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    if len(gts) == 1:
        return 1.0 if pred == gts[0] else 0.0
    total_matches = sum(gt == pred for gt in gts)
    accs = [min(1.0, (total_matches - (gt == pred)) / 3.0) for gt in gts]
    return sum(accs) / len(accs)


# ---------------------------------------------------------------- relaxed accuracy

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def _to_number(text: str) -> float | None:
    # A trailing '%' divides by 100, as in the ChartQA reference (pix2struct)
    # implementation, so "45%" and "0.45" agree while "45%" and "45" do not.
    s = text.strip()
    scale = 1.0
    if s.endswith("%"):
        s, scale = s[:-1].rstrip(), 0.01
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    value = float(s) * scale
    return value if math.isfinite(value) else None


def relaxed_accuracy(prediction: str, answer: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy for one item.

    The tolerance forgives the rounding a model does when reading values off a
    chart; non-numeric answers (labels, names) still need an exact match.
    """
    pred_num, target_num = _to_number(prediction), _to_number(answer)
    if pred_num is not None and target_num is not None:
        if target_num == 0:
            # Relative error is undefined at 0; only an exact zero counts.
            return 1.0 if pred_num == 0 else 0.0
        return 1.0 if abs(pred_num - target_num) / abs(target_num) <= tolerance else 0.0
    return 1.0 if prediction.strip().lower() == answer.strip().lower() else 0.0


METRICS: dict[str, Callable[..., float]] = {
    "anls": anls,
    "vqa_accuracy": vqa_accuracy,
    "relaxed_accuracy": relaxed_accuracy,
}
