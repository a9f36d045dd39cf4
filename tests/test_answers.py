"""Answer checkers (cousins/drift/answers.py) on outputs written in the styles real models use:
chain of thought that meets the gold number on the way to a wrong final answer, thinking spans,
multiple-choice letters in every form, fractions, thousands separators, LaTeX, GSM8K `#### N` and
MATH `\\boxed{}` solutions. `auto` must give the right verdict on every case; `contains` (the old
rule) is shown to miss the cases the checkers exist for."""

from __future__ import annotations

import pytest

from cousins.drift.answers import BadReference, judge, split_thinking

ABCD = ["Paris", "Lyon", "Nice", "Lille"]

# (output, reference, choices, correct)
CASES = [
    # a wrong final answer after the right number
    ("5 + 7 = 12, so the answer is 13", "12", None, False),
    ("First 12 apples, then 3 more are eaten. The answer is 9.", "12", None, False),
    ("We have 12. Doubling gives 24. Final answer: 25", "24", None, False),
    ("12 + 30 = 42, minus 1 is 41. #### 41", "42", None, False),
    ("Step 1: 6*7 = 42. Step 2: add 1. The answer is 43.", "42", None, False),
    # the right final answer after other numbers
    ("5 + 7 = 12, so the answer is 12", "12", None, True),
    ("The answer is 13, since 5+8=13 and 12 is too small", "13", None, True),
    ("12 apples and 3 pears make 15 fruits", "15", None, True),
    ("Natalia sold 48/2 = 24 clips in May. 48+24 = 72. #### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72",
     None, True),
    ("Total: $1,250.00", "1250", None, True),
    ("The total is 1,000", "1000", None, True),
    ("It is 1/2", "0.5", None, True),
    ("The answer is \\frac{1}{2}.", "0.5", None, True),
    ("so the result is \\boxed{\\frac{3}{4}}", "Adding gives $\\boxed{0.75}$.", None, True),
    ("so the result is \\boxed{\\frac{3}{5}}", "Adding gives $\\boxed{0.75}$.", None, False),
    ("the answer is 3.5.", "3.5", None, True),
    ("the answer is 3.50", "7/2", None, True),
    ("I am not sure.", "7", None, False),
    ("To answer this, we add 5 and 7 to get 12.", "12", None, True),  # "answer" alone states nothing
    ("The final answer: 25", "25", None, True),
    # thinking spans
    ("<think>maybe 42? no, 41</think> The answer is 41.", "42", None, False),
    ("<think>maybe 41? no, 42</think> The answer is 42.", "42", None, True),
    ("<think>12 + 30 = 42 so the answer is 42", "42", None, False),  # thinking cut: no answer
    ("<think>the capital is Paris</think>I don't know.", "Paris", None, False),
    ("Let me think.</think>\n\nThe answer is 7", "7", None, True),  # the template opened the span
    # multiple choice
    ("The answer is (B) because A is wrong", "A", ABCD, False),
    ("The answer is (B) because A is wrong", "B", ABCD, True),
    ("Answer: C", "2", ABCD, True),
    ("**D**", "D", ABCD, True),
    ("I believe the correct choice is D.", "3", ABCD, True),
    ("B. Lyon is in the south-east", "B", ABCD, True),
    ("A is tempting, but the correct option is C", "A", ABCD, False),
    ("The capital of France is Paris.", "A", ABCD, True),
    ("The capital of France is Lyon.", "A", ABCD, False),
    ("<think>A or B? Paris is A</think>(B)", "A", ABCD, False),
    # short answers
    ("The capital is Paris.", "Paris", None, True),
    ("The capital is Lyon.", "Paris", None, False),
    ("dlrow", "dlrow", None, True),
]


@pytest.mark.parametrize("output,reference,choices,correct", CASES)
def test_auto_judges_the_final_answer(output, reference, choices, correct):
    v = judge(output, reference, "auto", choices)
    assert v.correct is correct, (v, output, reference)


def test_auto_picks_the_checker_from_the_reference_and_names_what_it_read():
    assert judge("so 5 + 7 = 12, the answer is 13", "12").checker == "math"
    assert judge("so 5 + 7 = 12, the answer is 13", "12").extracted == "13"
    assert judge("x", "B", choices=ABCD).checker == "mcq"
    assert judge("x", "\\boxed{2}").checker == "boxed"
    assert judge("the capital is Paris", "Paris").checker == "contains"
    v = judge("<think>maybe 42? no, 41</think> The answer is 41.", "42")
    assert (v.correct, v.extracted) == (False, "41")


def test_the_old_rule_misses_what_the_checkers_are_for():
    """`contains` gives the wrong verdict on the chain-of-thought cases: the gold number met on the way."""
    wrong = [(o, r, c, ok) for o, r, c, ok in CASES
             if judge(o, r, "contains" if c is None else "mcq", c).correct != ok]
    contains_wrong = [case for case in CASES if case[2] is None and judge(case[0], case[1], "contains").correct != case[3]]
    assert not [w for w in wrong if w[2] is not None]  # mcq right on every multiple-choice case
    assert len(contains_wrong) >= 8


def test_each_named_checker():
    assert judge("The answer is 41. I checked 42 twice.", "41", "last_number").correct
    assert not judge("The answer is 41. I checked 42 twice.", "42", "last_number").correct
    assert judge("so #### 72", "72", "gsm8k-strict").correct
    assert not judge("so the answer is 72", "72", "gsm8k-strict").correct  # strict wants ####
    assert judge("so the answer is 72", "72", "gsm8k-flexible").correct
    assert judge("Result = 19 (final)", "19", "regex", pattern=r"Result = (\d+)").correct
    assert judge("x \\boxed{2} then \\boxed{3}", "3", "boxed").extracted == "3"
    assert judge("  Paris. ", "paris", "exact").correct and not judge("Paris, France", "paris", "exact").correct
    assert judge("It is 1/2", "\\frac{1}{2}", "math").correct


def test_references_a_checker_cannot_read_are_refused_and_unparsable_answers_are_counted():
    with pytest.raises(BadReference, match="holds no number"):
        judge("12", "twelve", "last_number")
    with pytest.raises(BadReference, match="names none of the 4 choices"):
        judge("A", "F", "mcq", ABCD)
    with pytest.raises(BadReference, match="needs the row's choices"):
        judge("A", "A", "mcq")
    with pytest.raises(ValueError, match="unknown answer checker"):
        judge("A", "A", "fuzzy")
    v = judge("The answer is \\frac{{{", "2", "math")
    assert (v.correct, v.unparsed) == (False, True)  # not correct, unparsed: counted, never a crash
    assert judge("The answer is 2", "2", "math").unparsed is False


def test_the_thinking_span_is_split_off():
    s = split_thinking("<think>a b c</think> answer")
    assert (s.thinking, s.answer, s.finished) == ("a b c", " answer", True)
    s = split_thinking("<think>a b c")
    assert (s.thinking, s.answer, s.finished) == ("a b c", "", False)
    s = split_thinking("plain answer")
    assert (s.thinking, s.answer, s.finished) == (None, "plain answer", True)


def test_a_rows_own_checker_wins_over_its_category_the_corpus_and_the_run():
    """reference_errors fixes each prompt row's checker (its column, else its category's, else the
    corpus's; null: the run's), and Rule judges by it: a regex corpus row reads its pattern."""
    import pyarrow as pa

    from cousins.drift.answers import Rule, reference_errors

    batch = pa.table({"reference": ["42", "42", "B", "7", "x"], "choices": [None, None, ["a", "b"], None, None],
                      "category": ["gsm", "words", "mc", "gsm", "words"],
                      "checker": ["exact", None, None, None, "last_number"]})
    out = reference_errors(batch, rule=Rule("contains", pattern=r"(\d+)"), by_category={"gsm": "regex", "mc": "mcq"},
                           corpus_checker="math").to_pydict()
    assert out["checker"] == ["exact", "math", "mcq", "regex", "last_number"]
    # a row whose own checker cannot read its reference becomes an error row naming that checker
    assert out["reason"][:4] == [None] * 4 and "'last_number' cannot read" in out["reason"][4]
    rule = Rule("contains", pattern=r"ANSWER=(\d+)", group=1, which="first")
    assert rule.judge("ANSWER=7 then ANSWER=8", "7", row_checker="regex").correct
    assert not rule.judge("ANSWER=8", "7", row_checker="regex").correct
    assert rule.name("42", None, None) == "contains" and rule.name("42", None, "auto") == "math"
    # the run's rule judges rows with no checker of their own; a row's own overrides it
    assert Rule("exact").correct("so it is 42", "42") is False
    assert Rule("exact").correct("so it is 42", "42", row_checker="math") is True
    assert Rule("last_number").correct("no number", "words") is None  # not judged, not wrong
    # a row naming `regex` when the corpus gives no pattern is an error row, not a failed diff
    lone = reference_errors(pa.table({"reference": ["7"], "choices": [None], "category": [None],
                                      "checker": ["regex"]}), rule=Rule("auto")).to_pydict()
    assert "needs corpus.answer.pattern" in lone["reason"][0]
