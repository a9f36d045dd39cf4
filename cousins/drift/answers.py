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
from dataclasses import dataclass

from cousins.contract.config import ROW_CHECKERS
from cousins.drift.extract import (BadReference, choice_letter, final_number, last_boxed, last_number, math_equal,
                                   mcq_letter, normalise, reference_number, same_number, stated_answer)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CHECKERS = ("auto", "last_number", "regex", "gsm8k-strict", "gsm8k-flexible", "boxed", "mcq", "math", "exact",
            "contains")
assert set(ROW_CHECKERS) <= set(CHECKERS)
REGEX_PRESETS = {  # lm-eval-harness gsm8k: (pattern, which match)
    "gsm8k-strict": (r"#### (\-?[0-9\.\,]+)", "first"),
    "gsm8k-flexible": (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", "last"),
}
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


# --- the rule ------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class Rule:
    """How a run judges its labelled rows: a row's own checker (its prompt row's `checker`, set
    from the corpus's column, category map or checker) else `checker` (drift.answer_match); the
    `regex` checker's pattern, group and match (corpus.answer)."""

    checker: str = "auto"
    pattern: str | None = None
    group: int = 1
    which: str = "last"

    @classmethod
    def of(cls, rule: "Rule | str") -> "Rule":
        return rule if isinstance(rule, Rule) else cls(rule)

    @classmethod
    def of_config(cls, cfg) -> "Rule":
        """A run's rule from its Config (drift.answer_match, corpus.answer)."""
        a = cfg.corpus.answer
        return cls(cfg.drift.answer_match, a.pattern, a.group, a.which)

    def name(self, reference: str, choices: list[str] | None = None, row_checker: str | None = None) -> str:
        """The checker that judges a row (`auto` resolved)."""
        checker = row_checker or self.checker
        return auto_checker(reference, choices) if checker == "auto" else checker

    def judge(self, text: str, reference: str, choices: list[str] | None = None,
              row_checker: str | None = None) -> Verdict:
        return judge(text, reference, row_checker or self.checker, choices, pattern=self.pattern, group=self.group,
                     which=self.which)

    def correct(self, text: str, reference: str, choices: list[str] | None = None,
                row_checker: str | None = None) -> bool | None:
        """judge(...).correct; None when the reference cannot be read under the checker (the row is
        then not judged, rather than judged wrong)."""
        try:
            return self.judge(text, reference, choices, row_checker).correct
        except BadReference:
            return None


def reference_errors(batch, *, rule: Rule, by_category: dict[str, str] | None = None,
                     corpus_checker: str | None = None):
    """A Ray Data map over prompt rows (pyarrow): each row's `checker` (its own, else its category's
    in `by_category`, else `corpus_checker`; null: the run's, `rule.checker`) and a `reason`
    column, set where that checker cannot read the row's reference."""
    import pyarrow as pa

    by_category = by_category or {}
    own = batch.column("checker").to_pylist() if "checker" in batch.column_names else [None] * batch.num_rows
    checkers, reasons = [], []
    for ref, choices, mine, category in zip(batch.column("reference").to_pylist(),
                                            batch.column("choices").to_pylist(), own,
                                            batch.column("category").to_pylist()):
        mine = mine or by_category.get(category) or corpus_checker
        checkers.append(mine)
        reason = None
        if ref is not None:
            checker = mine or rule.checker
            try:
                if checker == "regex" and not rule.pattern:  # (a row's own column may name it)
                    raise BadReference("the regex checker needs corpus.answer.pattern")
                check_reference(ref, checker, choices)
            except BadReference as e:
                reason = f"answer checker {checker!r} cannot read the reference: {e}"
        reasons.append(reason)
    if "checker" in batch.column_names:
        batch = batch.drop_columns(["checker"])
    return batch.append_column("checker", pa.array(checkers, pa.string())).append_column(
        "reason", pa.array(reasons, pa.string()))


def correct(text: str, reference: str, checker: str, choices: list[str] | None = None, **regex) -> bool | None:
    """Rule(checker, **regex).correct(...): None when the checker cannot read the reference."""
    return Rule(checker, **regex).correct(text, reference, choices)


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
        got = final_number(answer)
        return Verdict(got is not None and same_number(got, ref), got, checker)
    if checker == "boxed":
        ref = last_boxed(reference) or reference.strip()
        got = last_boxed(answer)
        if got is None:
            return Verdict(False, None, checker)
        if normalise(got) == normalise(ref) or same_number(got, ref):
            return Verdict(True, got, checker)
        ok, _, unparsed = math_equal(f"\\boxed{{{got}}}", f"\\boxed{{{ref}}}")
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
        if same_number(final, ref):  # plain numbers: no parser needed
            return Verdict(True, final, checker)
        ok, _, unparsed = math_equal(final, ref)
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
    ok = same_number(got, ref) or normalise(got) == normalise(ref)
    return Verdict(ok, got or None, checker)
