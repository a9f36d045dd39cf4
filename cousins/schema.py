"""The data contract: every table the service writes, declared once.

Everything that reads or writes a run imports its column names and Arrow schemas from here.
A row is identified across stages and reruns by (prompt_id, sample_index, model).
"""

from __future__ import annotations

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
    ]
)

ROW_KEY = ("prompt_id", "sample_index", "model")


def row_keys(table: pa.Table) -> list[str]:
    """The (prompt_id, sample_index) of each row as one string: the identity a model's rows share
    across batches, retries and resumed attempts."""
    return [f"{p}\0{i}" for p, i in zip(table.column("prompt_id").to_pylist(),
                                          table.column("sample_index").to_pylist())]


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast `table` to `schema` (columns in schema order), naming what is missing or extra."""
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise ValueError(f"table does not match the schema: missing columns {missing}, unexpected {extra}")
    return table.select(schema.names).cast(schema)
