"""Exact KLD (`drift.kld=exact`): per-token KL(original ‖ cousin) over the whole vocabulary.

The top-k mode bounds KLD from the top-k lists both models store (cousins/drift/metrics.py); a
model whose mass lies outside its top-k makes that bound loose. Exact mode adds a stage per
compared model: an actor holding two engines, the original's and the cousin's, teacher-forces the
same rows (the original's outputs) through both with every vocabulary logprob at every position
(vLLM's `prompt_logprobs=-1`, flat lists rather than a dict per position), reduces each position
to its KLD on the spot, and writes only those numbers (schema.KLD: one float per output token).
No full-vocabulary row is ever stored; the cost is a second engine per actor and the transfer of
a vocabulary of logprobs per position from each engine.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pyarrow as pa

from cousins import actors, schema, templates
from cousins.engine import CORE_ENV, EngineSpec, Placement, VllmBackend
from cousins.feeder import Feeder, Gate
from cousins.records import ModelEntry, ScoresDone

ALL_VOCAB = -1  # vLLM: every vocabulary entry's logprob


def full_spec(spec: EngineSpec) -> EngineSpec:
    """`spec`'s engine allowing full-vocabulary logprobs, on half its GPU memory share (the actor's
    two engines share its GPU)."""
    share = spec.gpu_memory_utilization
    return dataclasses.replace(spec, max_logprobs=ALL_VOCAB, gpu_memory_utilization=share / 2 if share else None)


def position_kld(p_ids, p_lps, q_ids, q_lps) -> float:
    """KL(p ‖ q) at one position from each model's (token ids, logprobs) over the vocabulary, in
    float64. A token q does not list (never, with the whole vocabulary) counts as q = 0."""
    p_ids, q_ids = np.asarray(p_ids, np.int64), np.asarray(q_ids, np.int64)
    v = int(max(p_ids.max(initial=-1), q_ids.max(initial=-1))) + 1
    lp, lq = np.full(v, -np.inf), np.full(v, -np.inf)
    lp[p_ids], lq[q_ids] = np.asarray(p_lps, np.float64), np.asarray(q_lps, np.float64)
    keep = np.isfinite(lp)
    return float(max(0.0, (np.exp(lp[keep]) * (lp[keep] - lq[keep])).sum()))


def _positions(prompt_logprobs, start: int, n: int):
    """(token ids, logprobs) of positions start..start+n of a vLLM prompt-logprobs result: flat
    lists (FlatLogprobs) or a dict per position."""
    if hasattr(prompt_logprobs, "start_indices"):
        f = prompt_logprobs
        for t in range(start, start + n):
            a, b = f.start_indices[t], f.end_indices[t]
            yield f.token_ids[a:b], f.logprobs[a:b]
    else:
        for pos in prompt_logprobs[start:start + n]:
            yield list(pos.keys()), [lp.logprob for lp in pos.values()]


class KldActor(actors.EngineRunner):
    """Two engines, the original's and a cousin's; called by Ray Data with the original's
    generation rows (SCORE_INPUT), it returns one KLD row per row (schema.KLD)."""

    def __init__(self, original: EngineSpec, cousin: EngineSpec, ledger=None, tolerate_load_failure: bool = False,
                 backend=None, reorder: bool = False):
        """`reorder` (the noise floor): the cousin's engine takes the batch's rows in reverse order,
        so its numbers come from other batch compositions than the original's, as in its scoring."""
        self.spec, self.ledger, self.reorder = cousin, ledger, reorder
        backend = backend or VllmBackend()
        self.llm, self.load_error = actors._load(full_spec(cousin), backend, ledger, tolerate_load_failure)
        self.reference, self.ref_error = actors._load(full_spec(original), backend, None, False)
        if self.llm is not None:
            self.params = backend.params(max_tokens=1, temperature=0.0, prompt_logprobs=ALL_VOCAB, detokenize=False,
                                         flat_logprobs=True)
            self.tokenizer = self.reference.get_tokenizer()  # the original's positions, for both
            # Cores in this process (vLLM's in-process engine core) must not step at once: they
            # would share vLLM's global forward context. In processes of their own they may.
            gate = None if os.environ.get(CORE_ENV) == "1" else Gate()
            self.feeder = Feeder(self.llm, gate, lora=actors.lora_request(backend, cousin))
            self.ref_feeder = Feeder(self.reference, gate)
            self.original_format = original.prompt_format
        self.actor = f"{actors._node_id()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._run(f"kld:{self.spec.model_name}", batch, self._rows, self._failed_rows)[0]

    def _failed_rows(self, batch: pa.Table, reason: str) -> pa.Table:
        n = batch.num_rows
        return actors.check_rows(self.spec.model_name, batch, pa.table({
            "prompt_id": batch.column("prompt_id"), "sample_index": batch.column("sample_index"),
            "model": pa.array([self.spec.model_name] * n, pa.string()),
            "kld_tokens": pa.nulls(n, pa.list_(pa.float32())), "engine_time_s": pa.nulls(n, pa.float64()),
            "error": pa.array([reason] * n, pa.string())}, schema=schema.KLD))

    def _rows(self, batch: pa.Table, solo: bool = False) -> tuple[pa.Table, int]:
        rows = batch.select(actors.SCORE_INPUT).to_pylist()
        errors: list[str | None] = [None] * len(rows)
        todo, inputs = [], []
        for i, row in enumerate(rows):
            if self.llm is None:
                errors[i] = self.load_error
            elif row["error"] is not None or not row["output_token_ids"]:
                errors[i] = "the original has no output here to score"
            else:
                ids = (templates.encode(self.tokenizer, row["prompt_text"], prompt_format=self.original_format)
                       + list(row["output_token_ids"]))
                if len(ids) + 1 > self.spec.max_model_len:
                    errors[i] = f"prompt + output is {len(ids)} tokens; scoring needs engine.max_model_len > that"
                else:
                    todo.append(i), inputs.append(ids)
        klds: dict[int, list[float]] = {}
        elapsed = 0.0
        if inputs:
            prompts = [{"prompt_token_ids": x} for x in inputs]
            t0 = time.perf_counter()
            p_out, _ = self.ref_feeder.run(prompts, self.params, solo)
            if self.reorder:
                q_out = self.feeder.run(prompts[::-1], self.params, solo)[0][::-1]
            else:
                q_out, _ = self.feeder.run(prompts, self.params, solo)
            for i, ids, p, q in zip(todo, inputs, p_out, q_out):
                n = len(rows[i]["output_token_ids"])
                start = len(ids) - n
                klds[i] = [position_kld(pi, pl, qi, ql) for (pi, pl), (qi, ql) in
                           zip(_positions(p.prompt_logprobs, start, n), _positions(q.prompt_logprobs, start, n))]
            elapsed = time.perf_counter() - t0
        total = sum(len(x) for x in inputs) or 1
        share = {i: elapsed * len(x) / total for i, x in zip(todo, inputs)}
        table = pa.table({
            "prompt_id": [r["prompt_id"] for r in rows], "sample_index": [r["sample_index"] for r in rows],
            "model": [self.spec.model_name] * len(rows),
            "kld_tokens": [klds.get(i) for i in range(len(rows))],
            "engine_time_s": [share.get(i) for i in range(len(rows))],
            "error": errors}, schema=schema.KLD)
        return actors.check_rows(self.spec.model_name, batch, table), sum(len(x) for x in inputs)


def stage_kld(run, *, entry: ModelEntry, original: EngineSpec, spec: EngineSpec, where: Placement,
              rows_per_file: int, backend=None) -> ScoresDone:
    """`entry`'s exact per-token KLD against the original over the original's outputs (kld/model=NAME).
    An unfinished stage is redone whole, as scoring is."""
    import ray

    from cousins.dataops import read_files
    from cousins.gpu_placement import engine_groups
    from cousins.ledger import new_ledger
    from cousins.progress import Bar, watch
    from cousins.run import publish_part
    from cousins.stages import LIGHT_TASK_CPUS, _blocks, _finish_scores, _ledger_poll, _run_pool
    from cousins.storage import data_files

    out = run.layout.kld(entry.name)
    if run.done(out):
        return run.marker(out, ScoresDone)
    run.restart(out)
    src = run.layout.generations(original.model_name)
    expected = run.count(src)
    t0 = time.perf_counter()
    rows = read_files(data_files(src), src.arrow_fs(), actors.SCORE_INPUT)
    ledger = new_ledger()
    what = f"exact KLD of {entry.name!r}"
    try:
        with engine_groups(where, what) as placed:
            pool = actors._pool(rows.repartition(_blocks(expected, where)), KldActor,
                                {"original": original, "cousin": spec, "ledger": ledger,
                                 "tolerate_load_failure": not entry.is_original, "backend": backend,
                                 "reorder": entry.reorder}, placed)
            with watch(Bar(f"exact KLD {entry.name}", expected), _ledger_poll(ledger, f"kld:{entry.name}", 0)):
                _run_pool(pool.map_batches(publish_part, fn_kwargs={"out": out}, batch_size=rows_per_file,
                                           batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS), what, placed)
            retries = ray.get(ledger.report.remote(f"kld:{entry.name}"))
    finally:
        ray.kill(ledger)
    return _finish_scores(run, entry, out, expected, time.perf_counter() - t0, where, retries, what="exact KLD")

