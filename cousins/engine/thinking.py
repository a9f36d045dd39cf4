"""A reasoning model's thinking span, split where the output is generated: how many of its output
tokens think, whether the thinking finished (or `max_tokens` cut it), and where its answer begins.

Markers are the model's own: `model.thinking_markers` (or a cousin's), else the first known pair
(`<think>`/`</think>` as Qwen3 and DeepSeek-R1, `<thinking>`…, `<|begin_of_thought|>`…) whose
closing marker the tokenizer has as an added token, else `<think>`/`</think>` read as text. Where the
closing marker is one token, the span ends at its last occurrence in the output's ids (exact, and
independent of how the text decodes special tokens); otherwise the text is split
(cousins/drift/answers.py's `split_thinking`) and the thinking text's tokens are counted. A chat
template that opens the span in the prompt (R1's ends the prompt with `<think>\\n`) makes an output
without a closing marker unfinished thinking, not an answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from cousins.drift.answers import THINK_CLOSE, THINK_OPEN, split_thinking

KNOWN = ((THINK_OPEN, THINK_CLOSE), ("<thinking>", "</thinking>"), ("<|begin_of_thought|>", "<|end_of_thought|>"))


@dataclass(frozen=True)
class Markers:
    open: str
    close: str
    open_id: int | None = None  # the marker's token id where the tokenizer has it as one token
    close_id: int | None = None


@dataclass(frozen=True)
class Span:
    """One output's split; all None when it has no thinking span."""

    thinking_tokens: int | None = None
    finished: bool | None = None
    answer_offset: int | None = None  # where the answer starts in the output text (characters)


def _added_vocab(tokenizer) -> dict[str, int]:
    try:
        return dict(tokenizer.get_added_vocab())
    except (AttributeError, NotImplementedError):
        return {}


def markers(tokenizer, configured: tuple[str, str] | list[str] | None = None) -> Markers:
    """The model's markers (see the module docstring), with their token ids where single tokens."""
    vocab = _added_vocab(tokenizer)
    if configured:
        pair = (configured[0], configured[1])
    else:
        pair = next(((o, c) for o, c in KNOWN if c in vocab), (THINK_OPEN, THINK_CLOSE))
    return Markers(pair[0], pair[1], vocab.get(pair[0]), vocab.get(pair[1]))


def opens_in_prompt(prompt_text: str | None, m: Markers) -> bool:
    """The rendered prompt ends inside an opened span (the template wrote the opening marker)."""
    if not prompt_text:
        return False
    return prompt_text.rfind(m.open) > prompt_text.rfind(m.close)


def split(ids: list[int], text: str, m: Markers, *, opened: bool = False, count=None, decode=None) -> Span:
    """The span of one output. `opened`: the prompt opened it; `count(text)`: the tokens of a text
    (for markers that are not single tokens); `decode(ids)`: the text of ids (to place the answer
    when the closing marker does not survive decoding)."""
    if m.close_id is not None:
        last = next((i for i in range(len(ids) - 1, -1, -1) if ids[i] == m.close_id), None)
        if last is not None:
            at = text.rfind(m.close)
            offset = at + len(m.close) if at >= 0 else (len(decode(ids[:last + 1])) if decode else len(text))
            return Span(last + 1, True, min(offset, len(text)))
        if opened or (m.open_id is not None and m.open_id in ids):
            return Span(len(ids), False, len(text))
        return Span()
    s = split_thinking(text, m.open, m.close)
    if s.thinking is None:
        return Span(len(ids), False, len(text)) if opened and text else Span()
    offset = len(text) - len(s.answer)
    n = len(ids) if not s.finished else min(len(ids), count(text[:offset]) if count else
                                            round(len(ids) * offset / max(len(text), 1)))
    return Span(n, s.finished, offset)
