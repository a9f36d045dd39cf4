"""The bundled demo corpus: a few hundred prompts of several kinds, written by code, never downloaded.

`write_demo_corpus(path)` is deterministic; `cousins/data/demo.jsonl` is its output, and a test
checks that the committed file still equals what this module writes.

Labelled prompts (a `reference`) come from task families the tiny teacher is taught
(cousins/family/lessons.py): additions and letter reversals it has not seen (held-out instances), the
times table, capitals, chemical symbols and function bodies (look-ups, taught whole). The open
prompts (writing, code requests, chats) have no reference.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from cousins.contract.config import DEMO_PATH, DISTILL_PATH, REASONING_PATH

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "India": "New Delhi", "China": "Beijing",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Mexico": "Mexico City", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Czechia": "Prague", "Denmark": "Copenhagen",
}
SYMBOLS = {
    "hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N", "oxygen": "O", "sodium": "Na",
    "magnesium": "Mg", "aluminium": "Al", "silicon": "Si", "sulfur": "S", "chlorine": "Cl",
    "potassium": "K", "calcium": "Ca", "iron": "Fe", "copper": "Cu", "zinc": "Zn", "silver": "Ag",
    "gold": "Au", "mercury": "Hg", "lead": "Pb",
}
FUNCTIONS = [
    ("def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n", "return a + b"),
    ("def is_even(n):\n    \"\"\"Return True when n is even.\"\"\"\n", "return n % 2 == 0"),
    ("def square(x):\n    \"\"\"Return x squared.\"\"\"\n", "return x * x"),
    ("def first(items):\n    \"\"\"Return the first element of items.\"\"\"\n", "return items[0]"),
    ("def last(items):\n    \"\"\"Return the last element of items.\"\"\"\n", "return items[-1]"),
    ("def reverse(s):\n    \"\"\"Return the string s reversed.\"\"\"\n", "return s[::-1]"),
    ("def count_words(text):\n    \"\"\"Return the number of words in text.\"\"\"\n", "return len(text.split())"),
    ("def mean(xs):\n    \"\"\"Return the arithmetic mean of xs.\"\"\"\n", "return sum(xs) / len(xs)"),
    ("def clamp(x, lo, hi):\n    \"\"\"Clamp x into [lo, hi].\"\"\"\n", "return max(lo, min(x, hi))"),
    ("def to_upper(s):\n    \"\"\"Return s in upper case.\"\"\"\n", "return s.upper()"),
    ("def keys_sorted(d):\n    \"\"\"Return the keys of d, sorted.\"\"\"\n", "return sorted(d)"),
    ("def flatten(rows):\n    \"\"\"Flatten a list of lists.\"\"\"\n", "return [x for row in rows for x in row]"),
]
DEMO_TOPICS = [
    "the sea", "autumn leaves", "a quiet library", "city traffic", "a cup of tea", "mountains",
    "a lost key", "the first snow", "a train station", "a garden at night", "old computers",
    "a river", "a thunderstorm", "a bicycle ride", "a market at dawn", "the moon",
]
_INSTRUCTIONS = [
    "Write a haiku about {t}.",
    "Describe {t} in two sentences.",
    "Give three words that remind you of {t}.",
    "Write a short story opening about {t}.",
    "Explain to a child what makes {t} interesting.",
]
CODE_TASKS = [
    "Write a Python function that returns the maximum of a list.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that counts vowels in a string.",
    "Write a Python class for a simple stack with push and pop.",
    "Write a Python function that reads a file and returns its lines.",
    "Write a Python function that returns the n-th Fibonacci number.",
]


_LETTERS = "abcdefghijklmnopqrstuvwxyz"
ADD_RANGE = (10, 99)  # operands of the addition prompts: two digits each
TIMES_RANGE = (2, 19)  # the times table, up to 19 x 19: more facts than the teacher sees often


def _unique_pairs(rng: random.Random, n: int, lo: int, hi: int) -> list[tuple[int, int]]:
    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < n:
        pairs[(rng.randint(lo, hi), rng.randint(lo, hi))] = None
    return list(pairs)


def letter_runs(rng: random.Random, n: int, taken: set[str] = frozenset()) -> list[str]:
    """`n` distinct runs of 3 to 5 lower-case letters, spaced ("c a t"), none in `taken`."""
    runs: dict[str, None] = {}
    while len(runs) < n:
        run = " ".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 5)))
        if run not in taken:
            runs[run] = None
    return list(runs)


def add_prompt(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def add_answer(a: int, b: int) -> str:
    """The sum worked digit by digit, units first, then said whole: "1 + 9 = 10, 5 + 9 + 1 = 15, so
    51 + 99 = 150". No intermediate number can pass for the reference (sums of two digits are below
    20, the references are not)."""
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    units = a0 + b0
    tens = f"{a1} + {b1} + 1 = {a1 + b1 + 1}" if units >= 10 else f"{a1} + {b1} = {a1 + b1}"
    return f"{a0} + {b0} = {units}, {tens}, so {a} + {b} = {a + b}"


def reverse_prompt(run: str) -> str:
    return f"Write these letters in reverse order: {run}"


def reverse_letters(run: str) -> str:
    return " ".join(reversed(run.split()))


def demo_records(seed: int = 0) -> list[dict]:
    """Every demo prompt, in a fixed order. Labelled kinds carry a `reference` answer."""
    rng = random.Random(seed)
    out: list[dict] = []
    for a, b in _unique_pairs(rng, 70, *ADD_RANGE):
        out.append({"prompt": add_prompt(a, b), "category": "arithmetic", "reference": str(a + b)})
    for a, b in _unique_pairs(rng, 30, *TIMES_RANGE):
        out.append({"prompt": f"What is {a} times {b}?", "category": "arithmetic", "reference": str(a * b)})
    for run in letter_runs(rng, 40):
        out.append({"prompt": reverse_prompt(run), "category": "string_transform", "reference": reverse_letters(run)})
    for country, capital in CAPITALS.items():
        out.append({"prompt": f"What is the capital of {country}?", "category": "factual",
                    "reference": capital})
    for element, symbol in SYMBOLS.items():
        out.append({"prompt": f"What is the chemical symbol for {element}?", "category": "factual",
                    "reference": symbol})
    for head, body in FUNCTIONS:
        out.append({"prompt": f"Complete this Python function:\n\n{head}", "category": "code_completion",
                    "reference": body})
    for task in CODE_TASKS:
        out.append({"prompt": task, "category": "code_instruction"})
    for template in _INSTRUCTIONS:
        for topic in DEMO_TOPICS:
            out.append({"prompt": template.format(t=topic), "category": "open_ended"})
    # A few chat-shaped rows, so the demo exercises the `messages` form as well.
    for topic in DEMO_TOPICS[:8]:
        out.append({
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": f"Summarise why people enjoy {topic}."},
            ],
            "category": "open_ended_chat",
        })
    return out


MORE_TOPICS = [
    "a lighthouse", "a desert", "a busy kitchen", "a chess game", "the last bus home", "a forest path",
    "a paper boat", "a music box", "an empty beach", "a rainy window", "a bakery", "a kite",
]


def distill_records(seed: int = 1) -> list[dict]:
    """Teacher-data prompts for the distilled cousin: the demo's kinds, disjoint from its prompts."""
    rng = random.Random(seed)
    taken = {r.get("prompt") for r in demo_records()}
    out: list[dict] = []
    for a, b in _unique_pairs(rng, 80, *ADD_RANGE):
        out.append({"prompt": add_prompt(a, b), "category": "arithmetic", "reference": str(a + b)})
    for a, b in _unique_pairs(rng, 20, *TIMES_RANGE):
        out.append({"prompt": f"Multiply {a} by {b}.", "category": "arithmetic", "reference": str(a * b)})
    for run in letter_runs(rng, 20):
        out.append({"prompt": reverse_prompt(run), "category": "string_transform", "reference": reverse_letters(run)})
    for country, capital in CAPITALS.items():
        out.append({"prompt": f"Which city is the capital of {country}?", "category": "factual", "reference": capital})
    for element, symbol in SYMBOLS.items():
        out.append({"prompt": f"Give the symbol of the element {element}.", "category": "factual", "reference": symbol})
    for head, _ in FUNCTIONS:
        out.append({"prompt": f"Explain what this function should do:\n\n{head}", "category": "code_instruction"})
    for template in _INSTRUCTIONS:
        for topic in MORE_TOPICS:
            out.append({"prompt": template.format(t=topic), "category": "open_ended"})
    return [r for r in out if r["prompt"] not in taken]


WORD_PROBLEMS = [  # (question with {a} {b}, answer clause with {s}); every one an addition
    ("{n} has {a} apples and buys {b} more. How many apples does {n} have now?", "{n} has {s} apples"),
    ("A shelf holds {a} books and {b} more are added. How many books are on the shelf?", "the shelf holds {s} books"),
    ("{n} walked {a} km on Monday and {b} km on Tuesday. How many km did {n} walk in all?", "{n} walked {s} km"),
    ("A class has {a} girls and {b} boys. How many pupils are in the class?", "the class has {s} pupils"),
    ("{n} saved {a} coins, then found {b} more. How many coins does {n} have?", "{n} has {s} coins"),
]
NAMES = ["Ann", "Tom", "Mia", "Leo", "Sara", "Ben", "Zoe", "Max"]


def word_problem(rng: random.Random, a: int, b: int) -> tuple[str, str]:
    """(question, the answer's clause) of a word problem on a + b, GSM8K-style."""
    q, clause = rng.choice(WORD_PROBLEMS)
    n = rng.choice(NAMES)
    return q.format(n=n, a=a, b=b), clause.format(n=n, s=a + b)


def options(rng: random.Random, right: str, pool: list[str], k: int = 4) -> tuple[list[str], str]:
    """`k` options with `right` among distractors from `pool`, shuffled; and the right one's letter."""
    picks = rng.sample([p for p in dict.fromkeys(pool) if p != right], k - 1) + [right]
    rng.shuffle(picks)
    return picks, "ABCDEFGH"[picks.index(right)]


def reasoning_records(seed: int = 2) -> list[dict]:
    """The reasoning demo (corpus=reasoning): word problems with GSM8K's `#### N` solutions, additions
    and letter reversals the teacher works out (in its thinking span when it thinks), and
    multiple-choice questions (facts and sums, lettered options, an answer letter). The sums and
    runs are the demo's own, so no lesson teaches them."""
    rng = random.Random(seed)
    base = demo_records()
    pairs = [tuple(int(x) for x in r["prompt"].removeprefix("What is ").removesuffix("?").split(" + "))
             for r in base if r["category"] == "arithmetic" and " + " in r["prompt"]]
    runs = [r["reference"] for r in base if r["category"] == "string_transform"]
    out = []
    for a, b in pairs[:30]:
        q, clause = word_problem(rng, a, b)
        out.append({"prompt": q, "category": "word_problem", "reference": f"{add_answer(a, b)}, so {clause}.\n#### {a + b}"})
    for a, b in pairs[30:50]:
        out.append({"prompt": add_prompt(a, b), "category": "arithmetic", "reference": str(a + b)})
    for run in runs[:20]:
        out.append({"prompt": reverse_prompt(run), "category": "string_transform", "reference": reverse_letters(run)})
    for country, capital in CAPITALS.items():
        choices, letter = options(rng, capital, list(CAPITALS.values()))
        out.append({"prompt": f"What is the capital of {country}?", "choices": choices, "reference": letter,
                    "category": "multiple_choice"})
    for element, symbol in SYMBOLS.items():
        choices, letter = options(rng, symbol, list(SYMBOLS.values()))
        out.append({"prompt": f"What is the chemical symbol for {element}?", "choices": choices, "reference": letter,
                    "category": "multiple_choice"})
    for a, b in pairs[50:70]:
        s = a + b
        choices, letter = options(rng, str(s), [str(s + d) for d in (-10, -1, 1, 10)])
        out.append({"prompt": add_prompt(a, b), "choices": choices, "reference": letter,
                    "category": "multiple_choice_sum"})
    return out


def write_demo_corpus(path: str | Path = DEMO_PATH, records: list[dict] | None = None, *,
                      setting: str = "--out") -> Path:
    """Write the corpus to `path`. Only the project's own corpus files (DEMO_PATH, DISTILL_PATH,
    REASONING_PATH) are ever rewritten; any other existing file is left as it is (NotOurs) unless it
    already holds exactly this corpus."""
    from cousins.run.removal import NotOurs

    path = Path(path)
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in (records or demo_records())]
    text = "\n".join(lines) + "\n"
    own = path.resolve() in (Path(p).resolve() for p in (DEMO_PATH, DISTILL_PATH, REASONING_PATH))
    if path.exists() and not own and (not path.is_file() or path.read_bytes() != text.encode("utf-8")):
        raise NotOurs(f"{setting}: {str(path)!r} already exists and is not this corpus: the project never deletes or "
                      f"overwrites files it did not write. Point {setting} at a new file")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_demo_corpus())
    print(write_demo_corpus(DISTILL_PATH, distill_records()))
