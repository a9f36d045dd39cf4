"""Answer checkers, as graders do: the verdict on an output's *final* answer, never on a number met
on the way or inside the thinking span.

`judge(text, reference, checker="auto", choices=None)` is the whole rule; drift rows, the run's
accounting and the export's answer filter all call it. Each checker is a small named filter in the
manner of lm-eval-harness's extraction filters, so every verdict can be traced to what was read:

- the thinking span (`<think>`…`</think>`) is cut first: the answer is what follows the last
  closing marker; an opened span that never closes (thinking cut by max_tokens) has no answer;
- `last_number`: the number of the stated final answer (the last `\\boxed{}`, or the clause after
  the last "the answer is", "Answer:", "####", …), else the output's last number;
- `regex`: a pattern, its group, the first or the last match (lm-eval's gsm8k `strict-match` and
  `flexible-extract` are the presets `gsm8k-strict` and `gsm8k-flexible`);
- `boxed`: the last `\\boxed{…}` (or `\\fbox{…}`), braces balanced;
- `mcq`: a letter among the row's choices in the forms models write (`(B)`, `B.`, `Answer: B`,
  `**B**`, "the correct choice is B"), else the one choice whose text the answer states;
- `math`: equivalence through Hugging Face's math-verify (`1/2` = `0.5` = `\\frac{1}{2}`,
  `1,000` = `1000`), with a time limit; an answer it cannot parse is "not correct, unparsed";
- `exact`: the normalised answer equals the normalised reference;
- `contains`: the normalised reference appears in the normalised answer as whole words (for short
  answers; it reads the answer after the thinking span, but anywhere in it);
- `auto`: a number (or a GSM8K `#### N` solution) -> `math` on the final answer; a letter or an
  index with choices -> `mcq`; a `\\boxed{}` solution -> `boxed`; else `contains`.

A reference that cannot be read under its checker (a `last_number` reference with no number, an
`mcq` reference that names no choice) raises `BadReference`: the caller makes it an error row.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from fractions import Fraction

from cousins.contract.config import ROW_CHECKERS
from cousins.run.corpus import LETTERS  # the letters the prompt lists the options with

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CHECKERS = ("auto", "last_number", "regex", "gsm8k-strict", "gsm8k-flexible", "boxed", "mcq", "math", "exact",
            "contains")
assert set(ROW_CHECKERS) <= set(CHECKERS)
REGEX_PRESETS = {  # lm-eval-harness gsm8k: (pattern, which match)
    "gsm8k-strict": (r"#### (\-?[0-9\.\,]+)", "first"),
    "gsm8k-flexible": (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", "last"),
}
MATH_TIMEOUT_S = 2  # per parse and per comparison (math-verify's own alarm; main thread only)
MAX_ANSWER_CHARS = 400  # what math-verify is given of a final answer (bounds its work off the main thread)


class BadReference(ValueError):
    """A reference that cannot be read under its checker."""


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None  # the answer the checker read (None: it found none)
    checker: str  # the checker that judged (`auto` resolved)
    unparsed: bool = False  # math: an answer math-verify could not parse (not correct; counted)


@dataclass(frozen=True)
class Split:
    """An output cut at its thinking span."""

    thinking: str | None  # None: no thinking span
    answer: str  # "" when the thinking never closed
    finished: bool  # False: a span opened and never closed


def split_thinking(text: str, open_marker: str = THINK_OPEN, close_marker: str = THINK_CLOSE) -> Split:
    """The thinking span and the answer: the answer follows the last closing marker. A closing
    marker without an opening one (templates that open the span in the prompt) still closes it."""
    close = text.rfind(close_marker)
    if close >= 0:
        start = text.find(open_marker)
        begin = start + len(open_marker) if 0 <= start < close else 0
        return Split(text[begin:close], text[close + len(close_marker):], True)
    start = text.find(open_marker)
    if start >= 0:
        return Split(text[start + len(open_marker):], "", False)
    return Split(None, text, True)


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


def _final_number(answer: str) -> str | None:
    """The number of the stated final answer (its first), else the answer's last number."""
    stated = stated_answer(answer)
    if stated is not None:
        found = _NUMBER.findall(stated)
        return found[0].strip() if found else None
    return last_number(answer)


def _same_number(a: str, b: str) -> bool:
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

def _math_equal(answer: str, reference: str) -> tuple[bool, str | None, bool]:
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


# --- the rule ------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space, trimmed (cousins.drift.metrics)."""
    from cousins.drift.metrics import normalise_answer

    return normalise_answer(str(text))


def check_reference(reference: str, checker: str, choices: list[str] | None = None) -> None:
    """BadReference when `checker` cannot read `reference` (before any engine runs, the prompts
    stage makes such a row an error row naming the checker)."""
    if checker == "auto":
        checker = auto_checker(reference, choices)
    ref = str(reference)
    if checker == "last_number" and reference_number(ref) is None:
        raise BadReference(f"reference {ref[:80]!r} holds no number")
    if checker == "mcq":
        if not choices:
            raise BadReference("checker mcq needs the row's choices")
        choice_letter(ref, choices)
    if checker in ("contains", "exact", "boxed", "math") and not normalise(ref):
        raise BadReference(f"reference {ref[:80]!r} is empty once normalised")


def reference_errors(batch, *, checker: str):
    """A Ray Data map over prompt rows (pyarrow): a `reason` column, set where `checker` cannot
    read the row's reference."""
    import pyarrow as pa

    reasons = []
    for ref, choices in zip(batch.column("reference").to_pylist(), batch.column("choices").to_pylist()):
        reason = None
        if ref is not None:
            try:
                check_reference(ref, checker, choices)
            except BadReference as e:
                reason = f"answer checker {checker!r} cannot read the reference: {e}"
        reasons.append(reason)
    return batch.append_column("reason", pa.array(reasons, pa.string()))


def correct(text: str, reference: str, checker: str, choices: list[str] | None = None, **regex) -> bool | None:
    """judge(...).correct for a row; None when the reference cannot be read under the checker (the
    row is then not judged, rather than judged wrong)."""
    try:
        return judge(text, reference, checker, choices, **regex).correct
    except BadReference:
        return None


def auto_checker(reference: str, choices: list[str] | None = None) -> str:
    """What `auto` picks from the reference's form."""
    ref = str(reference).strip()
    if choices:
        return "mcq"
    if last_boxed(ref) is not None:
        return "boxed"
    if reference_number(ref) is not None:
        return "math"
    return "contains"


def judge(text: str, reference: str, checker: str = "auto", choices: list[str] | None = None, *,
          pattern: str | None = None, group: int = 1, which: str = "last") -> Verdict:
    """The verdict on `text`'s final answer against `reference` (see the module's docstring).
    `pattern`/`group`/`which`: the `regex` checker's. BadReference for a reference its checker
    cannot read; ValueError for an unknown checker."""
    if checker not in CHECKERS:
        raise ValueError(f"unknown answer checker {checker!r}; known: {', '.join(CHECKERS)}")
    if checker == "auto":
        checker = auto_checker(reference, choices)
    answer = split_thinking(text or "").answer
    reference = str(reference)
    if checker in ("regex", *REGEX_PRESETS):
        return _regex(answer, reference, checker, pattern, group, which)
    if checker == "last_number":
        ref = reference_number(reference)
        if ref is None:
            raise BadReference(f"reference {reference!r} holds no number (checker last_number)")
        got = _final_number(answer)
        return Verdict(got is not None and _same_number(got, ref), got, checker)
    if checker == "boxed":
        ref = last_boxed(reference) or reference.strip()
        got = last_boxed(answer)
        if got is None:
            return Verdict(False, None, checker)
        if normalise(got) == normalise(ref) or _same_number(got, ref):
            return Verdict(True, got, checker)
        ok, _, unparsed = _math_equal(f"\\boxed{{{got}}}", f"\\boxed{{{ref}}}")
        return Verdict(ok, got, checker, unparsed)
    if checker == "mcq":
        if not choices:
            raise BadReference("checker mcq needs the row's choices")
        ref = choice_letter(reference, choices)
        got = mcq_letter(answer, choices)
        return Verdict(got == ref, got, checker)
    if checker == "math":
        ref = reference_number(reference) or last_boxed(reference) or reference.strip()
        final = stated_answer(answer)
        if final is None:  # none stated: the last number, as a grader's flexible filter reads it
            final = last_number(answer)
        if final is None:
            return Verdict(False, None, checker)
        if _same_number(final, ref):  # plain numbers: no parser needed
            return Verdict(True, final, checker)
        ok, _, unparsed = _math_equal(final, ref)
        return Verdict(ok, final, checker, unparsed)
    if checker == "exact":
        return Verdict(normalise(answer) == normalise(reference), answer.strip() or None, checker)
    ref = normalise(reference)  # contains
    if not ref:
        raise BadReference(f"reference {reference!r} is empty once normalised (checker contains)")
    ok = f" {ref} " in f" {normalise(answer)} "
    return Verdict(ok, reference if ok else None, checker)


def _regex(answer: str, reference: str, checker: str, pattern: str | None, group: int, which: str) -> Verdict:
    if checker in REGEX_PRESETS:
        pattern, which = REGEX_PRESETS[checker]
        group = 0  # the first non-empty group, as lm-eval's filter takes it
    if not pattern:
        raise ValueError("checker regex needs a pattern")
    matches = list(re.finditer(pattern, answer))
    ref = reference_number(reference) or reference.strip()
    if not matches:
        return Verdict(False, None, checker)
    m = matches[0] if which == "first" else matches[-1]
    got = next((g for g in m.groups() if g), m.group(0)) if group == 0 else (m.group(group) if m.re.groups else m.group(0))
    got = (got or "").strip()
    ok = _same_number(got, ref) or normalise(got) == normalise(ref)
    return Verdict(ok, got or None, checker)
