"""The data contract: every table the service writes, declared once.

Everything that reads or writes a run imports its column names and Arrow schemas from here.
A row is identified across stages and reruns by (prompt_id, sample_index, model).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# --- prompts -------------------------------------------------------------------------------------
# One row per usable corpus row. `messages` is the chat the model sees (before its chat template).

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

PROMPTS = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),  # corpus id, else a content hash
        pa.field("messages", pa.list_(MESSAGE), nullable=False),
        pa.field("category", pa.string()),  # null when the corpus has none
        pa.field("reference", pa.string()),  # reference answer for labelled prompts
        pa.field("choices", pa.list_(pa.string())),  # multiple choice: the options (A, B, …); null otherwise
        pa.field("checker", pa.string()),  # the answer checker the corpus names for the row; null: the run's
        pa.field("source", pa.string(), nullable=False),  # file the row came from
        pa.field("source_row", pa.int64(), nullable=False),  # 0-based line / row number in it
    ]
)

# --- corpus errors -------------------------------------------------------------------------------
# One row per corpus row that could not become a prompt. Rows in == prompts + errors.

ERRORS = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string()),  # the start of the offending row, for a human to look at
    ]
)

# --- generations ---------------------------------------------------------------------------------
# One row per prompt x sample x model. Top-k logprobs are typed nested lists, one entry per
# generated token, each holding k (token id, logprob) pairs sorted by logprob, descending.

GENERATIONS = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),  # the sampling seed of this row
        pa.field("category", pa.string()),
        pa.field("prompt_text", pa.string()),  # the prompt after the chat template
        pa.field("output_text", pa.string()),
        pa.field("output_token_ids", pa.list_(pa.int32())),
        pa.field("output_logprobs", pa.list_(pa.float32())),  # logprob of each sampled token
        pa.field("topk_token_ids", pa.list_(pa.list_(pa.int32()))),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        pa.field("finish_reason", pa.string()),  # "stop" | "length" | null on error
        pa.field("prompt_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        # This row's share of its batch's engine wall time, in proportion to its tokens (prompt +
        # output): rows of a batch share the engine, and the shares sum to the engine's busy time.
        pa.field("engine_time_s", pa.float64()),
        pa.field("engine_node", pa.string()),  # Ray node id of the engine actor
        pa.field("error", pa.string()),  # null when the row generated; otherwise why it did not
        # Reasoning models (cousins/engine/thinking.py), null when the output has no thinking span:
        # output tokens up to the end of the span (all of them when it never closed), the rest,
        # whether the span closed (False: max_tokens cut the thinking), and where in output_text
        # the answer begins (characters).
        pa.field("thinking_tokens", pa.int32()),
        pa.field("answer_tokens", pa.int32()),
        pa.field("thinking_finished", pa.bool_()),
        pa.field("answer_offset", pa.int32()),
        # Multiple choice by likelihood (cousins/engine/choices.py), on sample 0 of a prompt with
        # choices: each option's log-likelihood as the prompt's continuation, and the continuation's
        # length in characters (lm-eval's acc_norm divides by it).
        pa.field("choice_logprobs", pa.list_(pa.float64())),
        pa.field("choice_chars", pa.list_(pa.int32())),
    ]
)

# --- scores (teacher-forced) ------------------------------------------------------------------------
# One row per generation row of the ORIGINAL model and per scoring model (the original itself, each
# cousin, and the noise-floor pass): the scoring model's distribution at every position of the
# original's output, fed the original's prompt and output tokens (prompt logprobs, no sampling).
# Position t holds the scorer's top-k at output token t and the logprob it gives the original's token.

SCORES = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # the scoring model (cousin, original, noise-floor)
        pa.field("topk_token_ids", pa.list_(pa.list_(pa.int32()))),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        pa.field("token_logprobs", pa.list_(pa.float32())),  # logprob of the original's token y_t
        pa.field("engine_time_s", pa.float64()),
        pa.field("error", pa.string()),
    ]
)

# Exact KLD (drift.kld=exact): one row per row of the original's generations, per compared model,
# over the original's tokenizer vocabulary V with ids >= V (padded head rows) in one tail bucket
# (cousins/drift/vocab_kld.py). A position that cannot give a finite KL(original || model) makes
# its row an error row naming it.
KLD = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # the compared model (cousin or noise-floor)
        pa.field("kld_tokens", pa.list_(pa.float32())),  # KL(original || model) at each output position
        pa.field("rkld_tokens", pa.list_(pa.float32())),  # KL(model || original); null where infinite
        # the larger of the two models' probability on ids >= V at each position
        pa.field("tail_mass_tokens", pa.list_(pa.float32())),
        pa.field("engine_time_s", pa.float64()),
        pa.field("error", pa.string()),
    ]
)

# --- drift rows ----------------------------------------------------------------------------------
# One row per (prompt_id, sample_index) of the original x cousin. Token columns are over the
# original's output positions; the per-token lists make every summary figure recomputable.

DRIFT = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("cousin", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("tokens", pa.int32()),  # scored positions (the original's output tokens); null if text-only
        pa.field("kld_tokens", pa.list_(pa.float32())),  # KLD_t estimate from the top-k sets + rest bucket
        pa.field("rest_mass_tokens", pa.list_(pa.float32())),  # the original's mass in the rest bucket
        pa.field("margin_tokens", pa.list_(pa.float32())),  # the original's top-1 minus top-2 probability
        pa.field("same_top1_tokens", pa.list_(pa.bool_())),
        pa.field("dp_tokens", pa.list_(pa.float32())),  # q(y_t) - p(y_t)
        # drift.kld=exact only (null in top-k mode): KL(q || p) (null where infinite) and the larger
        # tail mass (ids past the tokenizer's vocabulary) at each position, from schema.KLD
        pa.field("rkld_tokens", pa.list_(pa.float32())),
        pa.field("tail_mass_tokens", pa.list_(pa.float32())),
        pa.field("kld_mean", pa.float64()),  # over this row's tokens
        pa.field("kld_max", pa.float64()),
        pa.field("same_top1", pa.float64()),  # fraction of this row's tokens
        pa.field("nll_original", pa.float64()),  # summed over tokens: -sum log p(y_t)
        pa.field("nll_cousin", pa.float64()),  # summed over tokens: -sum log q(y_t)
        # summed over tokens, for llama.cpp's Cor(ln PPL(Q), ln PPL(base)) and the uncertainty of
        # mean ln(PPL_c/PPL_o): sum (log p(y_t))^2, sum (log q(y_t))^2, sum log p(y_t) log q(y_t)
        pa.field("nll_original_sq", pa.float64()),
        pa.field("nll_cousin_sq", pa.float64()),
        pa.field("nll_cross", pa.float64()),
        pa.field("original_tokens", pa.int32()),  # output lengths of the two generations
        pa.field("cousin_tokens", pa.int32()),
        pa.field("length_ratio", pa.float64()),  # cousin_tokens / original_tokens (token efficiency)
        pa.field("exact_match", pa.bool_()),  # identical output token ids (same seed; greedy: same answer)
        pa.field("first_divergence", pa.int32()),  # first differing output token index; null if identical
        pa.field("chrf", pa.float64()),  # sacreBLEU's sentence chrF of the cousin's text against the original's, 0-100
        pa.field("rouge_l", pa.float64()),  # ROUGE-L F1 over whitespace words (case kept), 0-1
        pa.field("finish_original", pa.string()),
        pa.field("finish_cousin", pa.string()),
        pa.field("finish_changed", pa.bool_()),
        pa.field("correct_original", pa.bool_()),  # null when the prompt has no reference
        pa.field("correct_cousin", pa.bool_()),
        pa.field("flip", pa.bool_()),  # correctness differs from the original's
        # the answer checker that judged (cousins/drift/answers.py) and the final answers it read
        pa.field("checker", pa.string()),
        pa.field("answer_original", pa.string()),
        pa.field("answer_cousin", pa.string()),
        # an answer math-verify could not parse (judged not correct, and counted apart)
        pa.field("unparsed_original", pa.bool_()),
        pa.field("unparsed_cousin", pa.bool_()),
        # reasoning models: output tokens up to the end of the thinking span (<think>…</think>; all of
        # them when it never closed), and whether it closed; null when neither output has a span
        pa.field("thinking_original_tokens", pa.int32()),
        pa.field("thinking_cousin_tokens", pa.int32()),
        pa.field("thinking_finished_original", pa.bool_()),
        pa.field("thinking_finished_cousin", pa.bool_()),
        # multiple choice by likelihood (sample 0 of a prompt with choices; cousins/drift/options.py):
        # KL over the options (softmax of the choices' log-likelihoods) original -> cousin, the
        # original's top margin there, each model's most likely option, and whether it is the
        # reference's (acc; acc_norm: by log-likelihood per character) and whether that changed
        pa.field("option_kl", pa.float64()),
        pa.field("option_margin", pa.float64()),
        pa.field("option_original", pa.string()),
        pa.field("option_cousin", pa.string()),
        pa.field("mc_correct_original", pa.bool_()),
        pa.field("mc_correct_cousin", pa.bool_()),
        pa.field("mc_correct_norm_original", pa.bool_()),
        pa.field("mc_correct_norm_cousin", pa.bool_()),
        pa.field("mc_flip", pa.bool_()),
        pa.field("original_text", pa.string()),
        pa.field("cousin_text", pa.string()),
        # character spans [start, end) of the first divergent token in each text (null if identical)
        pa.field("div_original_start", pa.int32()),
        pa.field("div_original_end", pa.int32()),
        pa.field("div_cousin_start", pa.int32()),
        pa.field("div_cousin_end", pa.int32()),
        pa.field("error", pa.string()),  # why this row has no metrics (a generation or scoring error)
    ]
)

ROW_KEY = ("prompt_id", "sample_index", "model")


def row_keys(table: pa.Table) -> list[str]:
    """The (prompt_id, sample_index) of each row as one string: the identity a model's rows share
    across batches, retries and resumed attempts."""
    return [f"{p}\0{i}" for p, i in zip(table.column("prompt_id").to_pylist(),
                                          table.column("sample_index").to_pylist())]


KEY_HASH = np.dtype([("a", "<u8"), ("b", "<u8")])
_HASH_KEYS = ("cousins-row-key0", "cousins-row-key1")  # two independent 64-bit hashes (siphash keys)


def key_hashes(table: pa.Table, fields: tuple[str, ...] = KEY_HASH.names) -> np.ndarray:
    """The (prompt_id, sample_index) of each row as 16 bytes (KEY_HASH: two independent 64-bit
    hashes, the same in every process): what the driver and the workers hold of a stage's keys
    instead of the keys, at any size. Two of a billion distinct keys share one with probability
    about 1e-21. `fields=("a",)`: the first hash only (the second left 0)."""
    from pandas.util import hash_array

    ids = table.column("prompt_id").to_numpy(zero_copy_only=False).astype(object, copy=False)
    index = table.column("sample_index").to_numpy(zero_copy_only=False).astype(np.uint64)
    out = np.zeros(len(ids), KEY_HASH)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as a hash's should
        for field, key in zip(KEY_HASH.names, _HASH_KEYS):
            if field not in fields:
                continue
            h = hash_array(ids, hash_key=key, categorize=False) * np.uint64(0x9E3779B97F4A7C15) + index
            out[field] = hash_array(h)
    return out


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast `table` to `schema` (columns in schema order), naming what is missing or extra."""
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise ValueError(f"table does not match the schema: missing columns {missing}, unexpected {extra}")
    return table.select(schema.names).cast(schema)
