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


def efficiency(reader, prompts: Location, generations: Location, answer_match: str) -> dict:
    """Correct answers on labelled prompts and the output tokens spent on them (ModelStats fields).
    `reader` is the run (anything with `read(stage, columns)`)."""
    from cousins.drift.metrics import is_correct

    p = reader.read(prompts, ["prompt_id", "reference"])
    refs = {k: r for k, r in zip(p.column("prompt_id").to_pylist(), p.column("reference").to_pylist())
            if r is not None} if p.num_rows else {}
    if not refs:
        return {"labelled_rows": 0, "correct_rows": 0, "labelled_output_tokens": 0}
    t = reader.read(generations, ["prompt_id", "output_text", "output_tokens", "error"]).to_pydict()
    labelled = correct = tokens = 0
    for pid, text, n, err in zip(t["prompt_id"], t["output_text"], t["output_tokens"], t["error"]):
        if pid not in refs or err is not None:
            continue
        labelled += 1
        tokens += n or 0
        correct += is_correct(text or "", refs[pid], answer_match)
    return {"labelled_rows": labelled, "correct_rows": correct, "labelled_output_tokens": tokens}


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
