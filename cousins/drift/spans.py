"""Per-prompt sums of reasoning models' spans (cousins/drift/aggregate.py's SUMS): the thinking
span's length on each side, spans left unfinished, answer lengths; and the token metrics (KLD,
same top-1) over the original's output positions split at the end of its thinking span, so each
figure is reported over every output token and per span."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# token sums per span, over rows where either output has a thinking span: positions, KLD, same top-1
SPAN_SUMS = ["T_th", "kld_th", "same_th", "T_ans", "kld_ans", "same_ans"]


def flat(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values flattened (float64), with the row index of each value."""
    col = table.column(column).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
    values = pc.list_flatten(col).cast(pa.float64()).to_numpy(zero_copy_only=False)
    return values, np.repeat(np.arange(table.num_rows), lengths)


def col(table: pa.Table, name: str) -> np.ndarray:
    """A numeric or boolean column as float64, nulls as NaN."""
    return table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def thinking_sums(ok: pa.Table, per_prompt) -> dict:
    """Per-prompt sums of the thinking spans: rows with one (either side), thinking tokens, spans
    left unfinished, and answer tokens (all output tokens where there is no span)."""
    th_o, th_c = col(ok, "thinking_original_tokens"), col(ok, "thinking_cousin_tokens")
    has = (~np.isnan(th_o)).astype(float)
    unf_o = has * (1 - np.nan_to_num(col(ok, "thinking_finished_original"), nan=1.0))
    unf_c = has * (1 - np.nan_to_num(col(ok, "thinking_finished_cousin"), nan=1.0))
    return dict(think=per_prompt(has), th_o=per_prompt(np.nan_to_num(th_o)), th_c=per_prompt(np.nan_to_num(th_c)),
                unf_o=per_prompt(unf_o), unf_c=per_prompt(unf_c),
                ans_o=per_prompt(np.nan_to_num(col(ok, "original_tokens")) - np.nan_to_num(th_o)),
                ans_c=per_prompt(np.nan_to_num(col(ok, "cousin_tokens")) - np.nan_to_num(th_c)))


def span_token_sums(ok: pa.Table, kld: np.ndarray, same: np.ndarray, row: np.ndarray, per_prompt) -> dict:
    """Per-prompt sums (SPAN_SUMS) of per-token KLD and same top-1 (flattened, `row`: each value's
    row) in the original's thinking span (positions before `thinking_original_tokens`) and in its
    answer (the positions after), over rows with a span on either side."""
    thinking = col(ok, "thinking_original_tokens")
    lengths = np.bincount(row, minlength=ok.num_rows)
    position = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    has = ~np.isnan(thinking)[row]
    in_th = has & (position < np.nan_to_num(thinking, nan=0.0)[row])
    in_ans = has & ~in_th
    return {"T_th": per_prompt(in_th.astype(float)), "kld_th": per_prompt(np.where(in_th, kld, 0.0)),
            "same_th": per_prompt(np.where(in_th, same, 0.0)), "T_ans": per_prompt(in_ans.astype(float)),
            "kld_ans": per_prompt(np.where(in_ans, kld, 0.0)), "same_ans": per_prompt(np.where(in_ans, same, 0.0))}
