"""Multiple choice by likelihood, as lm-eval-harness's `multiple_choice` scores it: each option's
log-likelihood as the continuation of the prompt, teacher-forced (vLLM prompt logprobs, nothing
sampled), in the model's own generation pass (one engine start).

The continuation of option i is its letter (`corpus.answer.choice_target=letter`, for prompts that
list lettered options, MMLU-style) or its text (`text`, ARC/HellaSwag-style); after a raw prompt it
starts with a space (lm-eval's target delimiter), after a chat template's assistant header it does
not. Its tokens are the tail of the tokenized prompt + continuation past the prompt's own tokens (as
lm-eval splits a pair, so a merge across the boundary is not scored as two tokens); where the
prompt's tokens are not a prefix of the pair's, the continuation is tokenized alone.

vLLM does not read the prefix cache for a request that asks for prompt logprobs
(`SamplingParams.skip_reading_prefix_cache`, vLLM >= 0.11), so a choice's log-likelihood does not
depend on what else is in the batch or ran before (the noise floor's option KL is zero: docs/metrics.md).
"""

from __future__ import annotations

from cousins.engine import templates
from cousins.engine.rows import topk_columns
from cousins.run.corpus import LETTERS

def targets(choices: list[str], target: str) -> list[str]:
    return list(LETTERS[:len(choices)]) if target == "letter" else [str(c) for c in choices]


def continuation_ids(tokenizer, prompt_text: str, prompt_ids: list[int], target: str, prompt_format: str) -> list[int]:
    """The tokens of `target` as the continuation of the rendered prompt (see the module docstring)."""
    cont = (" " + target) if prompt_format == "raw" else target
    whole = templates.encode(tokenizer, prompt_text + cont, prompt_format=prompt_format)
    n = len(prompt_ids)
    if whole[:n] == prompt_ids and len(whole) > n:
        return whole[n:]
    return tokenizer.encode(cont, add_special_tokens=False)


def requests(tokenizer, rows: list[dict], texts: list, ids: list, todo: list[int], *, target: str,
             prompt_format: str, max_model_len: int) -> tuple[list[tuple[int, int, int, int]], list[list[int]]]:
    """The prompt-logprob requests of a batch's multiple-choice rows (sample 0 of a prompt with
    choices, among `todo`, the rows that generated): ([(row, option, start, target characters), …],
    token ids of each). A pair longer than the context is left out (that row gets no choice figures)."""
    keys, inputs = [], []
    if target == "off":
        return keys, inputs
    for i in todo:
        row = rows[i]
        if row.get("sample_index") != 0 or not row.get("choices"):
            continue
        strings = targets(row["choices"], target)
        conts = [continuation_ids(tokenizer, texts[i], ids[i], t, prompt_format) for t in strings]
        if not all(conts) or max(len(c) for c in conts) + len(ids[i]) + 1 > max_model_len:
            continue
        for k, (c, s) in enumerate(zip(conts, strings)):
            keys.append((i, k, len(ids[i]), len(s)))
            inputs.append(ids[i] + c)
    return keys, inputs


def loglikelihoods(keys: list[tuple[int, int, int, int]], inputs: list[list[int]],
                   outputs) -> dict[int, tuple[list, list]]:
    """Per row: (each option's log-likelihood, its target's characters), in option order."""
    out: dict[int, tuple[list, list]] = {}
    for (i, _, start, chars), ids, o in zip(keys, inputs, outputs):
        own = topk_columns(o.prompt_logprobs, 1, ids[start:], start)[2]
        lls, lens = out.setdefault(i, ([], []))
        lls.append(float(sum(own)))
        lens.append(chars)
    return out
