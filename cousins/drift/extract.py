"""What the answer checkers read (cousins/drift/answers.py): the stated final answer, numbers,
`\\boxed{}`, multiple-choice letters and math-verify's equivalence. Pure functions of text."""

from __future__ import annotations

import re
import threading
from fractions import Fraction

from cousins.run.corpus import LETTERS  # the letters the prompt lists the options with

MATH_TIMEOUT_S = 2  # per parse and per comparison (math-verify's own alarm; main thread only)
MAX_ANSWER_CHARS = 400  # what math-verify is given of a final answer (bounds its work off the main thread)


class BadReference(ValueError):
    """A reference that cannot be read under its checker."""


# --- the final-answer region ---------------------------------------------------------------------

_ANSWER_MARKERS = re.compile(
    r"\b(?:final answer|answer|correct (?:choice|option|answer)|choice|option|result)"
    r"\s*(?:is|would be|will be|=|:)\s*:?|####", re.IGNORECASE)  # a stated answer, not the word alone


def final_region(answer: str) -> str:
    """What follows the last stated answer marker ("the answer is", "Answer:", "####", …); the whole
    answer when it states none."""
    last = None
    for m in _ANSWER_MARKERS.finditer(answer):
        last = m
    return answer[last.end():] if last is not None and answer[last.end():].strip() else answer


_CLAUSE_END = re.compile(r"\n|\.(?!\d)|;|,\s|\s(?:because|since|as|so)\s", re.IGNORECASE)


def stated_answer(answer: str) -> str | None:
    """The final answer the output states: its last `\\boxed{}`, else the clause after its last
    answer marker; None when it states none."""
    boxed = last_boxed(answer)
    if boxed is not None:
        return boxed
    region = final_region(answer)
    if region is answer:
        return None
    m = _CLAUSE_END.search(region.lstrip())
    clause = region.lstrip()[:m.start()] if m else region.strip()
    return clause.strip().strip("*$ ") or None


# --- numbers -------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")


def _number_value(s: str) -> Fraction | None:
    s = s.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        if "/" in s:
            a, b = s.split("/", 1)
            return Fraction(a) / Fraction(b) if Fraction(b) else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].strip() if found else None


def reference_number(reference: str) -> str | None:
    """A number reference, or a GSM8K solution's `#### N`."""
    if "####" in reference:
        reference = reference.rsplit("####", 1)[1]
    ref = reference.strip()
    return ref if _NUMBER.fullmatch(ref.rstrip(".")) else None


def final_number(answer: str) -> str | None:
    """The number of the stated final answer (its first), else the answer's last number."""
    stated = stated_answer(answer)
    if stated is not None:
        found = _NUMBER.findall(stated)
        return found[0].strip() if found else None
    return last_number(answer)


def same_number(a: str, b: str) -> bool:
    va, vb = _number_value(a), _number_value(b)
    return va is not None and va == vb


# --- boxed ---------------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` or `\\fbox{…}`, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


# --- multiple choice -----------------------------------------------------------------------------

def choice_letter(reference: str, choices: list[str]) -> str:
    """The letter of the reference answer: a letter, an index (0-based), or the choice's text."""
    ref = str(reference).strip()
    n = len(choices)
    if len(ref) == 1 and ref.upper() in LETTERS[:n]:
        return ref.upper()
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", ref)
    if m and m.group(1).upper() in LETTERS[:n]:
        return m.group(1).upper()
    if re.fullmatch(r"\d+", ref) and int(ref) < n:
        return LETTERS[int(ref)]
    texts = [normalise(c) for c in choices]
    if normalise(ref) in texts:
        return LETTERS[texts.index(normalise(ref))]
    raise BadReference(f"reference {reference!r} names none of the {n} choices (a letter A-{LETTERS[n - 1]}, an "
                       f"index 0-{n - 1}, or a choice's text)")


def mcq_letter(answer: str, choices: list[str]) -> str | None:
    """The choice the answer states, in the forms models write, else by the choice's text."""
    valid = LETTERS[:len(choices)]
    letter = rf"([{valid}])"
    marker = None
    for marker in _ANSWER_MARKERS.finditer(answer):
        pass
    if marker is not None:  # "the answer is (B) because A is wrong": the first letter after the last marker
        m = re.match(rf"\s*(?:option|choice)?\s*[\(\[\*]*\s*{letter}(?![A-Za-z])", answer[marker.end():])
        if m:
            return m.group(1)
    for pattern in (rf"\*\*\s*\(?{letter}\)?\s*\*\*", rf"\({letter}\)", rf"(?m)^\s*{letter}\s*[\.\):]",
                    rf"(?:^|\s){letter}\s*$"):
        found = re.findall(pattern, answer)
        if found:
            return found[-1]
    text = normalise(answer)  # no letter: the choice whose text it states last
    best, at = None, -1
    for i, c in enumerate(choices):
        c = normalise(c)
        pos = f" {text} ".rfind(f" {c} ") if c else -1
        if pos > at:
            best, at = valid[i], pos
    return best


# --- math ----------------------------------------------------------------------------------------

def math_equal(answer: str, reference: str) -> tuple[bool, str | None, bool]:
    """(correct, extracted, unparsed) through math-verify, with a time limit per call."""
    from math_verify import parse, verify

    limit = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(reference[-MAX_ANSWER_CHARS:], parsing_timeout=limit)
        if not gold:
            raise BadReference(f"reference {reference!r} is not a mathematical answer math-verify can read")
        pred = parse(answer[-MAX_ANSWER_CHARS:], parsing_timeout=limit)
    except BadReference:
        raise
    except Exception:  # noqa: BLE001 - math-verify's failure is an unparsed answer, never a crash
        return False, None, True
    if not pred:
        return False, None, True
    extracted = str(pred[-1]) if isinstance(pred[-1], str) else str(pred[0])
    try:
        return bool(verify(gold, pred, timeout_seconds=limit)), extracted, False
    except Exception:  # noqa: BLE001
        return False, extracted, True


def normalise(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space, trimmed (cousins.drift.metrics)."""
    from cousins.drift.metrics import normalise_answer

    return normalise_answer(str(text))
