"""Thinking spans split where the output is generated (cousins/engine/thinking.py), and drift rows
that read the split from the generation rows (cousins/drift/compare.py)."""

from __future__ import annotations

import pyarrow as pa

from cousins.contract import schema
from cousins.drift.compare import compare
from cousins.engine import thinking


class Tok:
    """A tokenizer that has only what the split asks of one: its added tokens."""

    def __init__(self, added: dict[str, int]):
        self.added = added

    def get_added_vocab(self):
        return dict(self.added)


def test_markers_come_from_the_tokenizers_added_tokens_or_the_config():
    qwen = Tok({"<|im_end|>": 1, "<think>": 7, "</think>": 8})
    assert thinking.markers(qwen) == thinking.Markers("<think>", "</think>", 7, 8)
    other = Tok({"<|begin_of_thought|>": 3, "<|end_of_thought|>": 4})
    assert thinking.markers(other) == thinking.Markers("<|begin_of_thought|>", "<|end_of_thought|>", 3, 4)
    assert thinking.markers(Tok({})) == thinking.Markers("<think>", "</think>", None, None)  # read as text
    assert thinking.markers(qwen, ["[R]", "[/R]"]) == thinking.Markers("[R]", "[/R]", None, None)
    assert thinking.markers(object()) == thinking.Markers("<think>", "</think>", None, None)  # no added vocab


def test_the_span_ends_at_the_last_closing_token_and_an_unclosed_one_is_unfinished():
    m = thinking.Markers("<think>", "</think>", 7, 8)
    # ids: <think> a b </think> c d  (the text as a tokenizer that keeps the markers decodes it)
    text = "<think>a b</think> c d"
    assert thinking.split([7, 1, 2, 8, 3, 4], text, m) == thinking.Span(4, True, len("<think>a b</think>"))
    # a closing marker the decoding dropped (a special token): the answer placed by decoding the span
    assert thinking.split([7, 1, 2, 8, 3, 4], "a b c d", m, decode=lambda ids: "a b"[:2 * len(ids)]).answer_offset == 3
    assert thinking.split([7, 1, 2], "<think>a b", m) == thinking.Span(3, False, len("<think>a b"))
    assert thinking.split([1, 2], "a b", m) == thinking.Span()  # no span: an answer
    # R1's template opens the span in the prompt: no closing marker means thinking cut short
    assert thinking.split([1, 2], "a b", m, opened=True) == thinking.Span(2, False, 3)
    assert thinking.split([1, 8, 3], "a</think>c", m, opened=True) == thinking.Span(2, True, len("a</think>"))
    assert thinking.opens_in_prompt("<|im_start|>assistant\n<think>\n", m)
    assert not thinking.opens_in_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n", m)


def test_markers_as_text_count_the_thinking_texts_tokens():
    m = thinking.Markers("[R]", "[/R]")
    text = "[R]one two three[/R] four"
    span = thinking.split([1, 2, 3, 4, 5, 6], text, m, count=lambda t: len(t.replace("[", " [").split()))
    assert span == thinking.Span(4, True, len("[R]one two three[/R]"))
    assert thinking.split([1, 2], "[R]one two", m) == thinking.Span(2, False, len("[R]one two"))


def _gens(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema.GENERATIONS)


def test_drift_rows_read_the_split_the_engine_made_with_any_markers():
    """A model with its own markers ([R]…[/R]): the drift row takes the engine's split (tokens,
    finished, the answer's text for the answer metrics and the verdict), not a text search."""
    base = {"prompt_id": "p", "sample_index": 0, "model": "m", "seed": 1, "finish_reason": "stop", "error": None}
    orig = _gens([{**base, "output_text": "[R]12 then 13[/R] The answer is 12", "output_token_ids": [1] * 8,
                   "output_tokens": 8, "thinking_tokens": 5, "answer_tokens": 3, "thinking_finished": True,
                   "answer_offset": len("[R]12 then 13[/R]")}])
    cous = _gens([{**base, "output_text": "[R]12 or 13 or", "output_token_ids": [1] * 6, "output_tokens": 6,
                   "finish_reason": "length", "thinking_tokens": 6, "answer_tokens": 0, "thinking_finished": False,
                   "answer_offset": len("[R]12 or 13 or")}])
    row = compare("c", orig, cous, None, None, references={"p": "12"}, rule="auto").to_pylist()[0]
    assert row["thinking_original_tokens"] == 5 and row["thinking_cousin_tokens"] == 6
    assert row["thinking_finished_original"] is True and row["thinking_finished_cousin"] is False
    # the cousin mentions 12 only while thinking, and never answers: not correct
    assert row["correct_original"] is True and row["correct_cousin"] is False and row["answer_cousin"] is None
