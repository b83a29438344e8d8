"""The scorers on hand-written DeepSeek-R1-style replies: the answer is the last complete \\boxed{} after
the reasoning, nested braces included, compared after normalisation and numerically."""

from __future__ import annotations

import pytest

from distillery_operator.evaluation.scorers import (
    BOXED_INSTRUCTION,
    SCORERS,
    answers_match,
    as_number,
    last_boxed,
    normalize,
    score_boxed,
    score_contains,
    score_exact,
    strip_reasoning,
)

R1_REPLY = (
    "<think>\nOkay, so I need to add 17 and 25. 17 + 20 = 37, plus 5 is 42. Wait, let me check: maybe "
    "\\boxed{41}? No, 42.\n</think>\n\nTo add the numbers:\n\\[ 17 + 25 = 42 \\]\n\n**Final Answer**\n"
    "\\[\n\\boxed{42}\n\\]"
)


def test_an_r1_reply_scores_its_final_box_not_the_reasoning():
    assert score_boxed(R1_REPLY, "42") == 1.0
    assert score_boxed(R1_REPLY, "41") == 0.0  # 41 was only considered while thinking


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("so \\boxed{\\sqrt{\\frac{a^{2}}{b}}} done", "\\sqrt{\\frac{a^{2}}{b}}"),
    ("first \\boxed{3}, then \\boxed{4}, finally \\boxed{5}.", "5"),
    ("\\boxed {7}", "7"),
    ("\\fbox{8}", "8"),
    ("the set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal, not groups
    ("no box here: 42", None),
    ("an unclosed \\boxed{42", None),
    ("\\boxed{1} and an unfinished \\boxed{2", "1"),  # the last COMPLETE box counts
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("reply,expected", [
    ("<think>2+2 is \\boxed{4}</think>The answer is 5.", "The answer is 5."),
    ("2+2 is 4 I think.\n</think>\n\nAnswer: \\boxed{4}", "Answer: \\boxed{4}"),  # opening tag in the prompt
    ("<think>still thinking when max_tokens hit \\boxed{4}", ""),
    ("A model without reasoning: \\boxed{4}", "A model without reasoning: \\boxed{4}"),
])
def test_strip_reasoning(reply, expected):
    assert strip_reasoning(reply) == expected


def test_a_box_only_inside_the_reasoning_is_no_answer():
    assert score_boxed("<think>maybe \\boxed{4}</think>I am not sure.", "4") == 0.0
    assert score_boxed("<think>the answer is \\boxed{4}", "4") == 0.0  # ran out of tokens while thinking


def test_no_box_scores_zero():
    assert score_boxed("The answer is 42.", "42") == 0.0


@pytest.mark.parametrize("given,expected", [
    ("\\frac{1}{2}", "1/2"), ("0.5", "\\frac{1}{2}"), ("\\dfrac{1}{2}", "0.5"), ("\\frac12", "0.50"),
    ("-\\frac{3}{4}", "-0.75"), ("$42$", "42"), ("42.", "42"), ("\\text{42}", "42"), ("1,000,000", "1000000"),
    ("  4 2 ", "42"), ("90^\\circ", "90"), ("15\\%", "15"), ("\\text{(B)}", "(B)"), ("x = 3", "x=3"),
    ("4.0", "4"),
])
def test_equivalent_answers_match(given, expected):
    assert answers_match(given, expected)


@pytest.mark.parametrize("given,expected", [
    ("\\frac{1}{3}", "0.33"), ("42", "24"), ("1,2", "12"), ("-5", "5"), ("\\frac{1}{0}", "0"), ("x=3", "3"),
])
def test_different_answers_do_not_match(given, expected):
    assert not answers_match(given, expected)


def test_normalize_and_numbers():
    assert normalize("$\\left( 1, 2 \\right)$.") == "(1,2)"
    assert as_number("\\frac{1}{0}") is None
    assert as_number("abc") is None
    assert as_number("-\\frac{1}{4}") == as_number("-0.25")


def test_exact_and_contains_see_only_the_answer():
    reply = "<think>Is it Paris? Or Lyon?</think>\n  Paris  "
    assert score_exact(reply, "Paris") == 1.0
    assert score_exact(reply, "paris") == 0.0
    assert score_exact("<think>Paris</think>Lyon", "Paris") == 0.0
    assert score_contains("<think>x</think>The capital is PARIS, of course.", "paris") == 1.0
    assert score_contains("<think>The capital is Paris</think>Lyon.", "Paris") == 0.0


def test_only_boxed_adds_r1s_math_instruction():
    assert SCORERS["boxed"].instruction == BOXED_INSTRUCTION
    assert "\\boxed{}" in BOXED_INSTRUCTION and BOXED_INSTRUCTION.startswith("Please reason step by step")
    assert SCORERS["exact"].instruction is None and SCORERS["contains"].instruction is None
