"""Scorers: how a model's reply is judged against a dataset's answer (1.0 right, 0.0 wrong).

`boxed` reads the answer in the LAST \\boxed{...} of the reply (R1 is told to put its final answer
there; earlier boxes are drafts) and compares it with the expected answer after normalisation, then
numerically (0.5 == 1/2 == \\frac{1}{2}). `exact` compares the whole reply, `contains` looks for the
answer in it. Every scorer sees the reply with its <think>...</think> reasoning already removed: a
number the model considered while thinking is not its answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

THINK_START = "<think>"
THINK_END = "</think>"

# R1's model card: "For mathematical problems, it is advisable to include a directive in your prompt such
# as: Please reason step by step, and put your final answer within \boxed{}."
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def strip_reasoning(text: str) -> str:
    """The reply without its reasoning: everything up to the last '</think>' goes; an opened '<think>'
    that never closed (the model ran out of tokens while thinking) leaves no answer at all."""
    if THINK_END in text:
        return text.rpartition(THINK_END)[2].strip()
    if text.lstrip().startswith(THINK_START):
        return ""
    return text.strip()


def _braced(text: str, start: int) -> str | None:
    """The content of the {...} group opening at text[start], nested braces matched; None if unclosed."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character (\{ is a literal brace in LaTeX) never opens or closes a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{...} (or \\fbox{...}) in `text`; None when there is none."""
    found: str | None = None
    found_at = -1
    for command in _BOX_COMMANDS:
        for match in re.finditer(re.escape(command) + r"\s*\{", text):
            content = _braced(text, match.end() - 1)
            if content is not None and match.start() > found_at:
                found, found_at = content, match.start()
    return found


def _unwrap(command: str, text: str) -> str:
    """Replace every \\command{X} by X (nested braces matched)."""
    pattern = re.compile(re.escape(command) + r"\s*\{")
    while match := pattern.search(text):
        content = _braced(text, match.end() - 1)
        if content is None:
            break
        text = text[: match.start()] + content + text[match.end() + len(content) + 1 :]
    return text


def normalize(answer: str) -> str:
    """A canonical spelling of a short answer: no math delimiters, \\text{}, \\left/\\right, spacing,
    trailing period, thousands separators or degree/percent marks; \\dfrac and \\tfrac are \\frac."""
    text = answer.strip()
    for a, b in (("$", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", "")):
        text = text.replace(a, b)
    for command in ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\boxed"):
        text = _unwrap(command, text)
    for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                 ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("^\\circ", ""), ("^{\\circ}", ""),
                 ("\\%", ""), ("%", "")):
        text = text.replace(a, b)
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,234,567 -> 1234567 (not the pair "1,2")
    text = re.sub(r"\s+", "", text)
    return text.rstrip(".").strip()


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"


def as_number(text: str) -> Fraction | None:
    """The exact value of a normalised answer (12, -3.5, .5, 1/2, \\frac{1}{2}, -\\frac12); else None."""
    if re.fullmatch(_NUMBER, text):
        return Fraction(text)
    fraction = (re.fullmatch(rf"({_NUMBER})/({_NUMBER})", text)
                or re.fullmatch(rf"([-+]?)\\frac\{{({_NUMBER})\}}\{{({_NUMBER})\}}", text)
                or re.fullmatch(r"([-+]?)\\frac(\d)(\d)", text))
    if fraction is None:
        return None
    groups = fraction.groups()
    sign = -1 if len(groups) == 3 and groups[0] == "-" else 1
    numerator, denominator = (Fraction(g) for g in groups[-2:])
    return None if denominator == 0 else sign * numerator / denominator


def answers_match(given: str, expected: str) -> bool:
    """Equal after normalisation, or the same number."""
    a, b = normalize(given), normalize(expected)
    if a == b:
        return True
    x, y = as_number(a), as_number(b)
    return x is not None and y is not None and x == y


def score_boxed(reply: str, expected: str) -> float:
    answer = last_boxed(strip_reasoning(reply))
    return float(answer is not None and answers_match(answer, expected))


def score_exact(reply: str, expected: str) -> float:
    """The whole reply is the answer (surrounding whitespace aside)."""
    return float(" ".join(strip_reasoning(reply).split()) == " ".join(expected.split()))


def score_contains(reply: str, expected: str) -> float:
    """The answer appears somewhere in the reply (case and spacing aside)."""
    return float(" ".join(expected.split()).casefold() in " ".join(strip_reasoning(reply).split()).casefold())


def extract_boxed(reply: str) -> str | None:
    return last_boxed(strip_reasoning(reply))


def extract_reply(reply: str) -> str | None:
    return strip_reasoning(reply)


@dataclass(frozen=True)
class Scorer:
    """A scorer: its score function, what it shows as the model's answer, and the instruction R1 needs
    in the user turn for its answer to be scorable."""

    name: str
    score: Callable[[str, str], float]
    extract: Callable[[str], str | None]
    instruction: str | None = None


SCORERS: dict[str, Scorer] = {
    "boxed": Scorer("boxed", score_boxed, extract_boxed, BOXED_INSTRUCTION),
    "exact": Scorer("exact", score_exact, extract_reply),
    "contains": Scorer("contains", score_contains, extract_reply),
}
