"""How a model's prompt is made from a corpus row's messages, and the check that the original and
its token-level cousins make the same tokens of it.

`chat` renders the messages with the tokenizer's chat template (with the model's
`chat_template_kwargs`, e.g. Qwen3's `enable_thinking`); `raw` is for base models without one: the
messages' contents joined by blank lines, the tokenizer's own special tokens (a BOS) added as its
config says. Scoring feeds the original's rendered prompt to every cousin, and token metrics compare
position by position, so a cousin whose template renders the corpus differently would be scored on
a prompt it never sees: `check_templates` refuses that before Ray starts, naming the first token
that differs.
"""

from __future__ import annotations

RAW_SEPARATOR = "\n\n"
CHECKED_PROMPTS = 8  # the corpus's first prompts that every token-level model renders before Ray starts


def render(tokenizer, messages: list[dict], *, prompt_format: str = "chat", chat_template_kwargs: dict | None = None) -> str:
    """The prompt text of `messages` for generation."""
    if prompt_format == "raw":
        return RAW_SEPARATOR.join(m["content"] for m in messages)
    # (transformers raises a ValueError naming the missing template for a tokenizer without one)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(chat_template_kwargs or {}))


def encode(tokenizer, text: str, *, prompt_format: str = "chat") -> list[int]:
    """The token ids of a rendered prompt: a chat template writes its own special tokens; raw text
    gets the ones the tokenizer adds itself (a BOS)."""
    return tokenizer.encode(text, add_special_tokens=prompt_format == "raw")


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two id lists differ (the shorter one's length if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_renders(original: tuple[str, object, str, dict], cousins: list[tuple[str, object, str, dict]],
                    prompts: list[list[dict]]) -> list[str]:
    """Problems (one per model) where a model's tokenizer/template cannot render the prompts or a
    cousin's ids differ from the original's. Each model is (config key, tokenizer, prompt_format,
    chat_template_kwargs)."""
    problems = []

    def ids_of(model, messages):
        _, tok, fmt, kwargs = model
        return encode(tok, render(tok, messages, prompt_format=fmt, chat_template_kwargs=kwargs), prompt_format=fmt)

    try:
        want = [ids_of(original, m) for m in prompts]
    except Exception as e:  # noqa: BLE001 - a template that fails is reported, with the fix
        return [f"{original[0]}: cannot render the corpus's prompts: {type(e).__name__}: {e} "
                f"(set {original[0]}.prompt_format=raw for a base model, or fix chat_template_kwargs)"]
    for model in cousins:
        where, tok = model[0], model[1]
        for n, (messages, ids) in enumerate(zip(prompts, want)):
            try:
                got = ids_of(model, messages)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{where}: cannot render the corpus's prompt {n}: {type(e).__name__}: {e} "
                                f"(set {where}.prompt_format or chat_template_kwargs)")
                break
            at = first_difference(ids, got)
            if at is not None:
                def name(seq):
                    return repr(tok.convert_ids_to_tokens(seq[at])) if at < len(seq) else "(end of prompt)"
                problems.append(
                    f"{where}: renders the corpus's prompt {n} to other tokens than {original[0]!r}: first "
                    f"difference at token {at}: {name(ids)} (original) vs {name(got)} ({where}); its "
                    f"scores would be of another prompt. Align {where}.chat_template_kwargs/prompt_format "
                    f"with the original's, or set {where}.text_only=true")
                break
    return problems
