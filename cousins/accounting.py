"""What a run's models did and cost, as the job prints it: correct answers and the tokens spent on
them, and the table at the end of a generation or drift job."""

from __future__ import annotations

from dataclasses import dataclass

from cousins.records import ModelStats
from cousins.storage import Location


@dataclass
class RunResult:
    run_id: str
    run_url: str
    corpus_rows: int
    prompts: int
    corpus_errors: int
    models: list[ModelStats]
    state: str = "new"  # new | resumed | committed (was already)


_ZERO = {"labelled_rows": 0, "correct_rows": 0, "labelled_output_tokens": 0}


def _efficiency_partition(block, *, schemas: dict, answer_match: str):
    import pyarrow as pa

    from cousins.dataops import split
    from cousins.drift.metrics import is_correct

    sides = split(block, schemas)
    p = sides["prompt"]
    refs = {k: r for k, r in zip(p.column("prompt_id").to_pylist(), p.column("reference").to_pylist()) if r is not None}
    g = sides["gen"].to_pydict()
    labelled = correct = tokens = 0
    for pid, text, n, err in zip(g["prompt_id"], g["output_text"], g["output_tokens"], g["error"]):
        if pid not in refs or err is not None:
            continue
        labelled += 1
        tokens += n or 0
        correct += is_correct(text or "", refs[pid], answer_match)
    return pa.table({"labelled_rows": [labelled], "correct_rows": [correct], "labelled_output_tokens": [tokens]})


def efficiency(prompts: Location, generations: Location, answer_match: str) -> dict:
    """Correct answers on labelled prompts and the output tokens spent on them (ModelStats fields),
    checked on the connected Ray where each prompt's reference meets its generations; the driver
    gets three sums per partition."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from cousins.dataops import co_partition, partitions_for, read_stage
    from cousins.storage import data_files

    files = data_files(prompts)
    if not files or not data_files(generations):
        return dict(_ZERO)
    labelled = pads.dataset(files, filesystem=prompts.arrow_fs(), format="parquet").count_rows(
        filter=pads.field("reference").is_valid())  # streamed, one column
    if not labelled:
        return dict(_ZERO)
    schemas = {"prompt": pa.schema([("prompt_id", pa.string()), ("reference", pa.string())]),
               "gen": pa.schema([("prompt_id", pa.string()), ("output_text", pa.string()),
                                 ("output_tokens", pa.int32()), ("error", pa.string())])}
    rows = pads.dataset(data_files(generations), filesystem=generations.arrow_fs(), format="parquet").count_rows()
    sides = {"prompt": read_stage(prompts, schemas["prompt"].names), "gen": read_stage(generations, schemas["gen"].names)}
    out = dict(_ZERO)
    for r in co_partition(sides, schemas, "prompt_id", partitions_for(rows, 50_000)).map_batches(
            _efficiency_partition, batch_size=None, batch_format="pyarrow", num_cpus=0.5,
            fn_kwargs={"schemas": schemas, "answer_match": answer_match}).take_all():
        for k in out:
            out[k] += int(r[k])
    return out


def summary_table(result: RunResult) -> str:
    header = ("model", "prompts", "samples", "rows", "error rows", "output tokens", "tok/s", "engine tok/s",
              "actor-s", "tok/prompt", "tok/correct", "cost/1M tok")
    lines = [header]
    opt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for s in result.models:
        lines.append((s.model, str(s.prompts), str(s.samples), str(s.rows), str(s.error_rows),
                      str(s.output_tokens), f"{s.tokens_per_s:.1f}",
                      f"{s.output_tokens / s.engine_s:.1f}" if s.engine_s else "-",
                      f"{s.accelerator_s:.1f}", opt(s.tokens_per_prompt, ".1f"), opt(s.tokens_per_correct, ".1f"),
                      opt(s.cost_per_1m_output_tokens, ".3f")))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    body = [fmt(lines[0]), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in lines[1:]]
    notes = []
    for s in result.models:
        if s.new_rows != s.rows:
            notes.append(f"{s.model}: {s.rows - s.new_rows} rows from an earlier attempt, {s.new_rows} generated now")
        r = s.retries
        if r and (r["batches_retried"] or r["engine_starts"] > r["engine_actors"]):
            notes.append(f"{s.model}: {r['batches_retried']} batches ({r['rows_retried']} rows) retried, "
                         f"{r['engine_starts']} engine starts")
    verb = {"new": "committed", "resumed": "resumed and committed", "committed": "was already committed"}[result.state]
    foot = ["actor-s: engine actor-seconds of this attempt (GPU-seconds on GPU engines); tok/correct: output "
            "tokens per correct answer on labelled prompts; cost needs cost.price_per_accelerator_hour",
            f"corpus rows: {result.corpus_rows} (prompts {result.prompts}, error rows {result.corpus_errors})",
            *notes, f"run {result.run_id} {verb} at {result.run_url}"]
    return "\n".join(body + foot)
