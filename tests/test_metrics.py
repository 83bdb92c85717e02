from __future__ import annotations

import pytest

from bench.metrics import (
    METRICS,
    anls,
    levenshtein,
    normalize_vqa_answer,
    relaxed_accuracy,
    vqa_accuracy,
)


def test_registry_maps_names_to_functions():
    assert METRICS == {
        "anls": anls,
        "vqa_accuracy": vqa_accuracy,
        "relaxed_accuracy": relaxed_accuracy,
    }


# ---------------------------------------------------------------------- levenshtein


@pytest.mark.parametrize(
    "a, b, expected",
    [("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("same", "same", 0)],
)
def test_levenshtein(a, b, expected):
    assert levenshtein(a, b) == expected
    assert levenshtein(b, a) == expected


# ----------------------------------------------------------------------------- ANLS


def test_anls_exact_match():
    assert anls("invoice", ["invoice"]) == 1.0


def test_anls_one_edit_in_four_chars():
    assert anls("cbt", ["cat"]) == pytest.approx(2 / 3)
    assert anls("abcx", ["abcd"]) == pytest.approx(0.75)
    assert anls("abc", ["abcd"]) == pytest.approx(0.75)  # deletion, max len 4


def test_anls_boundary_is_kept_as_the_official_code_does():
    # score = 1 - NL is zeroed only when it is BELOW 0.5: NL == 0.5 scores 0.5
    assert anls("abxy", ["abcd"]) == pytest.approx(0.5)
    assert anls("24", ["23"]) == pytest.approx(0.5)  # one wrong digit of a 2-digit answer
    assert anls("2", ["23"]) == pytest.approx(0.5)
    assert anls("wxyz", ["abcd"]) == 0.0
    assert anls("abxyz", ["abcd"]) == 0.0  # 3 edits / 5 = 0.6 -> 0.4 < 0.5
    assert anls("abxy", ["abcd"], threshold=0.6) == 0.0


def test_anls_divides_by_the_raw_lengths():
    # distance on normalised strings (1: "13" vs "12"), length of the raw prediction (4 with its spaces)
    assert anls(" 13 ", ["12"]) == pytest.approx(0.75)
    assert anls("1   3", ["1 2"]) == pytest.approx(0.8)  # dist("1 3", "1 2") = 1, raw length 5
    # verbatim len(s.upper()): upper-casing "ß" gives "SS", so the answer's length is 2
    assert anls("s", ["ß"]) == pytest.approx(0.5)


def _official_anls(prediction: str, answers: list[str]) -> float:
    """The per-question loop of the DocVQA evaluation script, transcribed statement by statement."""
    values = []
    for answer in answers:
        gt_answer = " ".join(answer.strip().lower().split())
        det_answer = " ".join(prediction.strip().lower().split())
        dist = levenshtein(gt_answer, det_answer)
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else float(dist) / float(length))
    question_result = 1 - min(values)
    if question_result < 0.5:
        question_result = 0
    return question_result


def test_anls_equals_the_official_loop_on_random_strings():
    import random

    rng = random.Random(0)
    alphabet = "ab1 2\tAB"
    for _ in range(3000):
        pred = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        answers = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(1, 3))]
        assert anls(pred, answers) == _official_anls(pred, answers), (pred, answers)


def test_anls_takes_max_over_answers():
    assert anls("abcx", ["zzzz", "abcd", "abxy"]) == pytest.approx(0.75)
    assert anls("abcd", ["abxy", "abcd"]) == 1.0


def test_anls_case_and_whitespace_insensitive():
    assert anls("  Total   AMOUNT ", ["total amount"]) == 1.0
    assert anls("total\tamount\n", "TOTAL AMOUNT") == 1.0


def test_anls_plain_string_is_one_answer():
    assert anls("abcx", "abcd") == pytest.approx(0.75)


def test_anls_empty_strings():
    assert anls("", [""]) == 1.0
    assert anls("", ["abc"]) == 0.0
    assert anls("abc", []) == 0.0


# --------------------------------------------------------------------- VQA accuracy


def _ten(matching: int, answer: str = "cat", other: str = "dog") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


@pytest.mark.parametrize(
    "matching, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)],
)
def test_vqa_official_leave_one_out_values(matching, expected):
    assert vqa_accuracy("cat", _ten(matching)) == pytest.approx(expected)


def test_vqa_leave_one_out_with_few_answers():
    # n=2, one match: subsets drop the match (0/3) or the miss (1/3) -> mean 1/6.
    assert vqa_accuracy("cat", ["cat", "dog"]) == pytest.approx(1 / 6)


@pytest.mark.parametrize(
    "pred, gt",
    [
        ("Two", "2"),
        ("2", "two"),
        ("the cat", "cat"),
        ("A cat", "cat"),
        ("yes.", "yes"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("Yes\n", "yes"),
        ("red-white", "red white"),
    ],
)
def test_vqa_normalization_matches(pred, gt):
    assert vqa_accuracy(pred, [gt]) == 1.0
    assert vqa_accuracy(pred, [gt] * 10) == 1.0


def test_vqa_normalization_details():
    assert normalize_vqa_answer("1,000") == "1000"  # digit-comma-digit: deleted, not spaced
    assert normalize_vqa_answer("red,white") == "red white"  # no digit comma: spaced
    assert normalize_vqa_answer("3.5") == "3.5"  # decimal point survives
    assert normalize_vqa_answer("end.") == "end"
    assert normalize_vqa_answer("The Two dogs") == "2 dogs"
    assert normalize_vqa_answer("\tisnt it?\n") == "isn't it"


def test_vqa_normalization_does_not_overmatch():
    assert vqa_accuracy("3.5", ["35"]) == 0.0
    assert vqa_accuracy("cats", ["cat"]) == 0.0
    assert vqa_accuracy("two cats", ["2"]) == 0.0


def test_vqa_single_answer_rule_is_binary():
    assert vqa_accuracy("cat", ["cat"]) == 1.0
    assert vqa_accuracy("cat", "cat") == 1.0  # plain string = one answer
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    assert vqa_accuracy("cat", []) == 0.0


# ----------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize(
    "pred, target, expected",
    [
        ("105", "100", 1.0),  # exactly 5% -> inside
        ("95", "100", 1.0),
        ("104.9", "100", 1.0),
        ("105.1", "100", 0.0),
        ("94.9", "100", 0.0),
        ("-10.4", "-10", 1.0),
        ("-10.6", "-10", 0.0),
    ],
)
def test_relaxed_five_percent_boundary(pred, target, expected):
    assert relaxed_accuracy(pred, target) == expected


def test_relaxed_custom_tolerance():
    assert relaxed_accuracy("108", "100") == 0.0
    assert relaxed_accuracy("108", "100", tolerance=0.1) == 1.0


def test_relaxed_target_zero_needs_exact_zero():
    assert relaxed_accuracy("0", "0") == 1.0
    assert relaxed_accuracy("0.0", "0") == 1.0
    assert relaxed_accuracy("0.001", "0") == 0.0
    assert relaxed_accuracy("-0.01", "0.0") == 0.0


def test_relaxed_percent_sign():
    assert relaxed_accuracy("45%", "45%") == 1.0
    assert relaxed_accuracy("46%", "45%") == 1.0
    assert relaxed_accuracy("48%", "45%") == 0.0
    assert relaxed_accuracy("0.45", "45%") == 1.0  # % means /100
    assert relaxed_accuracy("45", "45%") == 0.0


def test_relaxed_thousands_commas_and_whitespace():
    assert relaxed_accuracy(" 1,234 ", "1234") == 1.0
    assert relaxed_accuracy("1,300", "1,234") == 0.0  # 5.3% off
    assert relaxed_accuracy("1,250,000", "1.2e6") == 1.0


def test_relaxed_non_numeric_exact_match_case_insensitive():
    assert relaxed_accuracy("  United States ", "united states") == 1.0
    assert relaxed_accuracy("United State", "United States") == 0.0
    assert relaxed_accuracy("12 apples", "12") == 0.0  # not a number -> string compare
    assert relaxed_accuracy("1,23", "123") == 0.0  # malformed thousands: not a number


@pytest.mark.parametrize("fn, args", [(anls, ("x", ["y"])), (vqa_accuracy, ("x", ["y"])), (relaxed_accuracy, ("x", "y"))])
def test_scores_are_floats(fn, args):
    result = fn(*args)
    assert type(result) is float and 0.0 <= result <= 1.0
