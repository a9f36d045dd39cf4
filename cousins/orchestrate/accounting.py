"""What a run's models did and cost, as the job prints it: correct answers and the tokens spent on
them, and the table at the end of a generation or drift job."""

from __future__ import annotations

from dataclasses import dataclass

from cousins.contract import schema
from cousins.contract.records import ModelStats
from cousins.run.lifecycle import RunState
from cousins.run.storage import Location


@dataclass
class RunResult:
    run_id: str
    run_url: str
    corpus_rows: int
    prompts: int
    corpus_errors: int
    models: list[ModelStats]
    state: RunState = RunState.NEW  # of the run when this attempt opened it


_ZERO = {"labelled_rows": 0, "correct_rows": 0, "labelled_output_tokens": 0, "labelled_prompts": 0,
         "accuracy_se": None}
# per partition: the counts, and sums over its prompts of c^2, c n, n^2 (c correct of n labelled
# rows of a prompt) for the accuracy's prompt-clustered standard error (plane.accuracy_se)
_PARTIAL = ("labelled_rows", "correct_rows", "labelled_output_tokens", "labelled_prompts", "sum_c2", "sum_cn",
            "sum_n2")


def _efficiency_partition(block, *, schemas: dict, rule):
    import pyarrow as pa

    from cousins.run.dataops import split

    sides = split(block, schemas)
    p = sides["prompt"]
    refs = {k: r for k, r in zip(p.column("prompt_id").to_pylist(), p.column("reference").to_pylist()) if r is not None}
    options = ({k: c for k, c in zip(p.column("prompt_id").to_pylist(), p.column("choices").to_pylist()) if c}
               if "choices" in p.column_names else {})
    own = ({k: c for k, c in zip(p.column("prompt_id").to_pylist(), p.column("checker").to_pylist()) if c}
           if "checker" in p.column_names else {})
    g = sides["gen"].to_pydict()
    tokens = 0
    per_prompt: dict[str, list[int]] = {}  # prompt -> [labelled, correct]: a partition holds all of a prompt's rows
    for pid, text, n, err in zip(g["prompt_id"], g["output_text"], g["output_tokens"], g["error"]):
        if pid not in refs or err is not None:
            continue
        verdict = rule.correct(text or "", refs[pid], options.get(pid), own.get(pid))
        if verdict is None:  # a reference its checker cannot read: not judged
            continue
        tokens += n or 0
        counts = per_prompt.setdefault(pid, [0, 0])
        counts[0] += 1
        counts[1] += verdict
    nc = list(per_prompt.values())
    return pa.table({"labelled_rows": [sum(n for n, _ in nc)], "correct_rows": [sum(c for _, c in nc)],
                     "labelled_output_tokens": [tokens], "labelled_prompts": [len(nc)],
                     "sum_c2": [float(sum(c * c for _, c in nc))], "sum_cn": [float(sum(c * n for n, c in nc))],
                     "sum_n2": [float(sum(n * n for n, _ in nc))]})


def efficiency(prompts: Location, generations: Location, rule) -> dict:
    """Correct answers on labelled prompts, the output tokens spent on them, the labelled prompts
    answered and the accuracy's standard error clustered by prompt (ModelStats fields), checked on
    the connected Ray where each prompt's reference meets its generations; the driver gets seven
    sums per partition."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from cousins.drift.plane import accuracy_se
    from cousins.run.dataops import co_partition, partitions_for
    from cousins.run.layout import count_rows, part_files, read_rows

    files = part_files(prompts)
    if not files or not part_files(generations):
        return dict(_ZERO)
    labelled = count_rows(prompts, pads.field("reference").is_valid())  # streamed, one column
    if not labelled:
        return dict(_ZERO)
    schemas = {"prompt": pa.schema([("prompt_id", pa.string()), ("reference", pa.string()),
                                    ("choices", pa.list_(pa.string())), ("checker", pa.string())]),
               "gen": pa.schema([("prompt_id", pa.string()), ("output_text", pa.string()),
                                 ("output_tokens", pa.int32()), ("error", pa.string())])}
    rows = count_rows(generations)
    sides = {"prompt": read_rows(prompts, schemas["prompt"].names, schema=schema.PROMPTS),  # older runs: no choices
             "gen": read_rows(generations, schemas["gen"].names)}
    sums = dict.fromkeys(_PARTIAL, 0)
    for r in co_partition(sides, schemas, "prompt_id", partitions_for(rows, 50_000)).map_batches(
            _efficiency_partition, batch_size=None, batch_format="pyarrow", num_cpus=0.5,
            fn_kwargs={"schemas": schemas, "rule": rule}).take_all():
        for k in sums:
            sums[k] += r[k]
    out = {k: int(sums[k]) for k in ("labelled_rows", "correct_rows", "labelled_output_tokens", "labelled_prompts")}
    out["accuracy_se"] = accuracy_se(out["correct_rows"], out["labelled_rows"], out["labelled_prompts"],
                                     sums["sum_c2"], sums["sum_cn"], sums["sum_n2"])
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
        if s.rows and s.error_rows == s.rows:
            notes.append(f"warning: every row of {s.model} is an error row (first: {s.first_error}); it gives "
                         f"nothing to compare or export")
        if s.new_rows != s.rows:
            notes.append(f"{s.model}: {s.rows - s.new_rows} rows from an earlier attempt, {s.new_rows} generated now")
        r = s.retries
        if r and (r["batches_retried"] or r["engine_starts"] > r["engine_actors"]):
            notes.append(f"{s.model}: {r['batches_retried']} batches ({r['rows_retried']} rows) retried, "
                         f"{r['engine_starts']} engine starts")
    leads = [(s.retries["first_batch_at_s"], s.wall_s) for s in result.models
             if s.retries and s.retries.get("first_batch_at_s") is not None]
    if leads:
        lead, wall = sum(a for a, _ in leads), sum(b for _, b in leads)
        notes.append(f"before the first batch (Ray Data and engine actors starting, models loading): "
                     f"{lead:.1f} s of {wall:.1f} s wall over {len(leads)} generation stage(s)")
    parts: dict[str, float] = {}
    for s in result.models:  # each stage's start-up by part (its engines' mean), summed over stages
        for k, v in ((s.retries or {}).get("startup_s") or {}).items():
            parts[k] = parts.get(k, 0.0) + v
    if parts:
        names = {"actor_start_s": "actor start", "vllm_import_s": "vLLM import", "fetch_s": "model fetch",
                 "engine_init_s": "engine init (weights, KV cache)", "warm_up_s": "warm-up"}
        notes.append("start-up by part, summed over stages: " + ", ".join(
            f"{names.get(k, k)} {v:.1f} s" for k, v in parts.items()))
    verb = {RunState.NEW: "committed", RunState.RESUME: "resumed and committed",
            RunState.COMMITTED: "was already committed"}[result.state]
    foot = ["actor-s: engine actor-seconds of this attempt (GPU-seconds on GPU engines); tok/correct: output "
            "tokens per correct answer on labelled prompts; cost needs cost.price_per_accelerator_hour",
            f"corpus rows: {result.corpus_rows} (prompts {result.prompts}, error rows {result.corpus_errors})",
            *notes, f"run {result.run_id} {verb} at {result.run_url}"]
    return "\n".join(body + foot)
