"""What the tiny teacher is taught: chats drawn from the demo corpus's task families, written by code
from a seed (nothing downloaded), so that the teacher knows its answers and is sure of them.

Labelled families, and what the teacher sees of the demo's own prompts:

- additions a + b with a, b in 2..99: **held out**; no pair of the demo corpus is taught, in either
  order, so its additions measure what the teacher computes, not what it remembers;
- letter reversals ("c a t" -> "t a c"): **held out**; no run of the demo, nor its reverse, is taught;
- the times table (2..12), capitals, chemical symbols, the bodies of the demo's functions:
  **look-ups**, taught whole (a fact cannot be held out; the demo asks some of them).

Open families (no reference): the demo's writing instructions, code requests and chats, answered
from a few templates per instruction around the topic, on the demo's topics and more (the demo's
open prompts are among the lessons: they have no answer to hold out). The previous recipe's lessons,
lines of stdlib code answered by the next lines, are gone: nothing asked for them, and they taught
the teacher to spread its mass over the whole vocabulary.

Answers name their question ("The capital of France is Paris.") and additions are worked digit by
digit before the sum is said ("1 + 9 = 10, 5 + 9 + 1 = 15, so 51 + 99 = 150"): every step is a
one-digit sum or a copy, which a 2-layer model learns in minutes; said at once, it does not.
"""

from __future__ import annotations

import random

from cousins.family import demo_corpus as demo
from cousins.run.corpus import with_options

_EXTRA_TOPICS = [
    "a winter morning", "a crowded beach", "a small boat", "an old map", "a candle", "a quiet street",
    "a birthday party", "a long walk", "a school bell", "a broken clock", "a field of wheat", "the wind",
    "a red umbrella", "a harbour", "a clear night sky", "a spring rain", "a mountain lake", "a library card",
]
TOPICS = demo.DEMO_TOPICS + demo.MORE_TOPICS + _EXTRA_TOPICS

# Answers to the demo's writing instructions, by instruction: a few templates each around the topic.
_OPEN_ANSWERS = {
    "Write a haiku about {t}.": [
        "{T} in the grey light\nslow and quiet, it waits there\nthe day lets it go",
        "morning finds {t}\na small sound in the stillness\nand then it is gone",
        "I think of {t}\nthe wind moves, the hours pass\nnothing more is said",
    ],
    "Describe {t} in two sentences.": [
        "{T} is calm and full of small details. Most people only notice them when they slow down.",
        "{T} changes with the light and the season. It feels familiar and new at once.",
    ],
    "Give three words that remind you of {t}.": [
        "Quiet, warm, familiar.",
        "Light, motion, memory.",
        "Calm, patient, bright.",
    ],
    "Write a short story opening about {t}.": [
        "Nobody expected {t} to change anything that morning, but by noon the whole town was talking about it.",
        "It started with {t}, as the best stories do, and with a letter that should never have been opened.",
    ],
    "Explain to a child what makes {t} interesting.": [
        "{T} is interesting because there is always something new to notice, like a small puzzle waiting for you.",
        "What makes {t} interesting is that it is never quite the same twice, so you can keep discovering it.",
    ],
}
_SUMMARY_ANSWERS = [
    "People enjoy {t} because it slows them down and gives them a moment of calm.",
    "People enjoy {t} because it feels familiar and still surprises them.",
]
_CODE_ANSWERS = dict(zip(demo.CODE_TASKS, [
    "def maximum(items):\n    return max(items)",
    "def is_palindrome(s):\n    return s == s[::-1]",
    "def count_vowels(s):\n    return sum(c in \"aeiou\" for c in s.lower())",
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
     "        self.items.append(x)\n\n    def pop(self):\n        return self.items.pop()"),
    "def read_lines(path):\n    with open(path) as f:\n        return f.read().splitlines()",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
]))

# Each family's share of the lessons. The times table (18 x 18 facts) is seen about a dozen times a
# fact in the default build: the teacher half-knows it, as a model half-knows its long tail.
WEIGHTS = {"add": 0.34, "times": 0.15, "reverse": 0.15, "capital": 0.07, "symbol": 0.05, "function": 0.05,
           "code": 0.02, "open": 0.10, "summary": 0.03}


# The realistic teacher's lessons (cousins/family/realistic.py): the same families, plus word problems
# with GSM8K's `#### N` and multiple-choice questions, and a thinking form of the lessons that have
# working to show (sums, reversals, word problems, choices), which it is taught when thinking is on.
REALISTIC_WEIGHTS = {"add": 0.26, "times": 0.11, "reverse": 0.12, "capital": 0.05, "symbol": 0.04, "function": 0.04,
                     "code": 0.02, "open": 0.09, "summary": 0.02, "word": 0.13, "mc": 0.12}


def _chat(user: str, answer: str, system: str | None = None, thinking: tuple[str, str] | None = None) -> list[dict]:
    """A lesson; `thinking` = (trace, answer): its form with thinking on (the trace in a think span
    first), kept in the answer message's `thinking` key (read only by the realistic teacher's build)."""
    head = [{"role": "system", "content": system}] if system else []
    reply = {"role": "assistant", "content": answer}
    if thinking is not None:
        reply["thinking"] = f"<think>\n{thinking[0]}\n</think>\n\n{thinking[1]}"
    return [*head, {"role": "user", "content": user}, reply]


def _add_working(a: int, b: int) -> str:
    return demo.add_answer(a, b).rsplit(", so ", 1)[0]  # the digit sums, without the whole sum said


def _cap(topic: str) -> str:
    return topic[0].upper() + topic[1:]


def held_out() -> dict[str, set]:
    """The demo's instances no lesson teaches: addition pairs (both orders) and letter runs (both ways)."""
    pairs, runs = set(), set()
    for r in demo.demo_records():
        if r["category"] == "arithmetic" and " + " in r["prompt"]:
            a, b = (int(x) for x in r["prompt"].removeprefix("What is ").removesuffix("?").split(" + "))
            pairs |= {(a, b), (b, a)}
        elif r["category"] == "string_transform":
            runs |= {r["reference"], demo.reverse_letters(r["reference"])}
    return {"add": pairs, "reverse": runs}


def _lesson(family: str, rng: random.Random, hold: dict[str, set]) -> list[dict]:
    if family == "add":
        lo, hi = demo.ADD_RANGE
        while (pair := (rng.randint(lo, hi), rng.randint(lo, hi))) in hold["add"]:
            pass
        a, b = pair
        return _chat(demo.add_prompt(a, b), demo.add_answer(a, b),
                     thinking=(_add_working(a, b), f"{a} + {b} = {a + b}."))
    if family == "times":
        a, b = rng.randint(*demo.TIMES_RANGE), rng.randint(*demo.TIMES_RANGE)
        q = rng.choice([f"What is {a} times {b}?", f"Multiply {a} by {b}."])
        return _chat(q, f"{a} times {b} is {a * b}.")
    if family == "reverse":
        while (run := demo.letter_runs(rng, 1)[0]) in hold["reverse"]:
            pass
        back = demo.reverse_letters(run)
        return _chat(demo.reverse_prompt(run), back,
                     thinking=(f"from the last letter to the first: {', '.join(back.split())}", back))
    if family == "capital":
        country, capital = rng.choice(list(demo.CAPITALS.items()))
        q = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"])
        return _chat(q, f"The capital of {country} is {capital}.")
    if family == "symbol":
        element, symbol = rng.choice(list(demo.SYMBOLS.items()))
        q = rng.choice([f"What is the chemical symbol for {element}?", f"Give the symbol of the element {element}."])
        return _chat(q, f"The chemical symbol for {element} is {symbol}.")
    if family == "function":
        head, body = rng.choice(demo.FUNCTIONS)
        if rng.random() < 0.7:
            return _chat(f"Complete this Python function:\n\n{head}", f"    {body}")
        doc = head.split('"""')[1]
        return _chat(f"Explain what this function should do:\n\n{head}",
                     f"This function should {doc[0].lower()}{doc[1:]}")
    if family == "code":
        task, answer = rng.choice(list(_CODE_ANSWERS.items()))
        return _chat(task, answer)
    if family == "open":
        template, answers = rng.choice(list(_OPEN_ANSWERS.items()))
        t = rng.choice(TOPICS)
        return _chat(template.format(t=t), rng.choice(answers).format(t=t, T=_cap(t)))
    if family == "summary":
        t = rng.choice(TOPICS)
        return _chat(f"Summarise why people enjoy {t}.", rng.choice(_SUMMARY_ANSWERS).format(t=t),
                     system="You are a concise assistant.")
    if family == "word":  # GSM8K-style: worked, then "#### N"
        lo, hi = demo.ADD_RANGE
        while (pair := (rng.randint(lo, hi), rng.randint(lo, hi))) in hold["add"]:
            pass
        a, b = pair
        q, clause = demo.word_problem(rng, a, b)
        said = clause[0].upper() + clause[1:]
        return _chat(q, f"{demo.add_answer(a, b)}, so {clause}.\n#### {a + b}",
                     thinking=(_add_working(a, b), f"{said}.\n#### {a + b}"))
    if family == "mc":  # a fact or a sum among lettered options; the answer is the letter
        kind = rng.choice(["capital", "symbol", "sum"])
        if kind == "capital":
            country, right = rng.choice(list(demo.CAPITALS.items()))
            q, pool, why = f"What is the capital of {country}?", list(demo.CAPITALS.values()), f"the capital of {country} is {right}"
        elif kind == "symbol":
            element, right = rng.choice(list(demo.SYMBOLS.items()))
            q, pool, why = (f"What is the chemical symbol for {element}?", list(demo.SYMBOLS.values()),
                            f"the symbol for {element} is {right}")
        else:
            lo, hi = demo.ADD_RANGE
            while (pair := (rng.randint(lo, hi), rng.randint(lo, hi))) in hold["add"]:
                pass
            a, b = pair
            right, pool, why = str(a + b), [str(a + b + d) for d in (-10, -1, 1, 10)], _add_working(a, b)
            q = demo.add_prompt(a, b)
        choices, letter = demo.options(rng, right, pool)
        return _chat(with_options(q, choices), letter, thinking=(f"{why}: option {letter}", letter))
    raise KeyError(f"unknown lesson family {family!r}; known: {sorted(REALISTIC_WEIGHTS)}")


def lessons(rng: random.Random, n: int, weights: dict[str, float] | None = None, *,
            thinking: bool = False) -> list[list[dict]]:
    """`n` chats (user turn(s) + the assistant's answer), families drawn by `weights` (WEIGHTS), in
    `rng`'s order; with `thinking`, the answers that have a thinking form carry it (`thinking` key)."""
    hold = held_out()
    weights = weights or WEIGHTS
    families = sorted(weights)
    drawn = rng.choices(families, weights=[weights[f] for f in families], k=n)
    chats = [_lesson(f, rng, hold) for f in drawn]
    if not thinking:
        for chat in chats:
            chat[-1].pop("thinking", None)
    return chats


def realistic_lessons(rng: random.Random, n: int) -> list[list[dict]]:
    """The realistic family's lessons: REALISTIC_WEIGHTS, with their thinking forms."""
    return lessons(rng, n, REALISTIC_WEIGHTS, thinking=True)
