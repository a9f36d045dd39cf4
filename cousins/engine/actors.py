"""The engine actors: rows in, exactly one row out per row in, in input order.

`EngineActor` generates expanded prompt rows (cousins/engine/rows.py); `ScoreActor` runs the
original's outputs through one model teacher-forced; `BothActor` does both of a model's jobs on one
engine; `SelfScoringActor` is the original's generation pass emitting its own scores too. Each
actor holds one engine (cousins/engine/backend.py), fed by two batches at once
(cousins/engine/feeder.py), and returns exactly one row per input row (checked: `EngineContractError`
names the model and the batch). A row the engine cannot take (a prompt longer than the context, a
template that fails) becomes an error row with the reason, and the rest of its batch still runs.
An engine that dies is an error of the job, not of a row (cousins/engine/runner.py). Pools of them
run through cousins/engine/pool.py.

Logprobs are vLLM's raw model logprobs (before temperature and top-p), the distribution a student
distils from: for each generated token, the top-k (token id, logprob) pairs sorted by rank, plus
the sampled token's own logprob (which may lie outside the top-k when sampling).
"""

from __future__ import annotations

import dataclasses
import os

import pyarrow as pa
import pyarrow.compute as pc

from cousins.contract import schema
from cousins.engine import choices, templates, thinking
from cousins.engine.backend import EngineSpec, Sampling, backend_for, sampling_kwargs
from cousins.engine.feeder import Feeder
from cousins.engine.rows import (BOTH_OUT, SCORE_INPUT, TASK, Columns, as_output, check_rows,
                                 teacher_forced_inputs, topk_columns, trim_topk)
from cousins.engine.runner import EngineRunner, load_engine, lora_request, node_id
from cousins.run.ledger import SCORE, ledger_key


class EngineActor(EngineRunner):
    """One vLLM engine; called by Ray Data with Arrow batches of expanded prompt rows."""

    def __init__(self, spec: EngineSpec, sampling: Sampling, ledger=None, tolerate_load_failure: bool = False,
                 backend=None):
        self.spec, self.sampling, self.ledger = spec, sampling, ledger
        self.backend = backend_for(spec, backend)
        self.llm, self.load_error = load_engine(spec, self.backend, ledger, tolerate_load_failure)
        if self.llm is not None:
            self.tokenizer = self.llm.get_tokenizer()
            self.feeder = Feeder(self.llm, lora=lora_request(self.backend, spec))
            self.markers = thinking.markers(self.tokenizer, spec.thinking_markers)
            self.choice_params = self.backend.params(max_tokens=1, temperature=0.0, prompt_logprobs=1,
                                                     detokenize=False, flat_logprobs=True)
        # vLLM detokenizes every top-k logprob token of every position when it detokenizes (21
        # decodes a token at top-20: most of a small model's time on CPU). Only stop strings need
        # the engine's text; otherwise the actor decodes each finished output once.
        self.detokenize = bool(sampling.stop)
        self.node = node_id()
        self.actor = f"{self.node}:{os.getpid()}"  # for the ledger's per-actor working windows

    def _params(self, seed: int):
        return self.backend.params(**sampling_kwargs(self.sampling, seed, self.detokenize))

    def _prepare(self, messages: list[dict]) -> tuple[str, list[int]]:
        fmt = self.spec.prompt_format
        text = templates.render(self.tokenizer, messages, prompt_format=fmt,
                                chat_template_kwargs=self.spec.chat_template_kwargs)
        ids = templates.encode(self.tokenizer, text, prompt_format=fmt)
        if len(ids) >= self.spec.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; engine.max_model_len is {self.spec.max_model_len}")
        return text, ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.run_batch(ledger_key(self.spec.model_name), batch, self._work, self._failed_rows)[0]

    def _work(self, batch: pa.Table, solo: bool) -> tuple[pa.Table, int]:
        table = self._rows(batch, solo)
        return table, sum(x or 0 for x in table.column("output_tokens").to_pylist())

    def _failed_rows(self, batch: pa.Table, reason: str) -> pa.Table:
        """Every row of the batch an error row with `reason`."""
        cols = Columns()
        for row in batch.select(["prompt_id", "sample_index", "seed", "category"]).to_pylist():
            cols.add(prompt_id=row["prompt_id"], sample_index=row["sample_index"], seed=row["seed"],
                     model=self.spec.model_name, category=row.get("category"), engine_node=self.node, error=reason)
        return check_rows(self.spec.model_name, batch, cols.table())

    def _rows(self, batch: pa.Table, solo: bool = False) -> pa.Table:
        if self.llm is None:  # a cousin that failed to load fails its own rows, with the reason
            return self._failed_rows(batch, self.load_error)
        rows = batch.to_pylist()
        cols = Columns()
        texts: list[str | None] = []
        ids: list[list[int] | None] = []
        errors: list[str | None] = []
        with self.feeder.turn():  # once for the batch, not between every engine step
            for row in rows:
                try:
                    text, tok = self._prepare(row["messages"])
                    texts.append(text), ids.append(tok), errors.append(None)
                except Exception as e:  # noqa: BLE001 - a row the engine cannot take is an error row
                    texts.append(None), ids.append(None), errors.append(f"{type(e).__name__}: {e}")

        todo = [i for i, e in enumerate(errors) if e is None]
        # A chat endpoint renders the prompt with the server's own template: it gets the messages too.
        chat = [rows[i]["messages"] for i in todo] if self.spec.endpoint and self.spec.endpoint.api == "chat" else None
        outputs, elapsed = self._generate([ids[i] for i in todo], [rows[i]["seed"] for i in todo], errors, todo, solo,
                                          chat)
        outputs = [_or_error(o, errors, i) for i, o in zip(todo, outputs)]

        by_row = dict(zip(todo, outputs))
        options, t = self._options(rows, texts, ids, [i for i, o in by_row.items() if o is not None], solo)
        elapsed += t
        texts_out = {}
        with self.feeder.turn():  # the tokenizer between engine steps: decoding, thinking spans
            if not self.detokenize:
                texts_out = {i: self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)
                             for i, o in by_row.items() if o is not None}
            spans = {i: self._span(list(o.outputs[0].token_ids), o.outputs[0].text if self.detokenize
                                   else texts_out[i], texts[i]) for i, o in by_row.items() if o is not None}
        work = {i: len(ids[i]) + len(o.outputs[0].token_ids) for i, o in by_row.items() if o is not None}
        total_work = sum(work.values()) or 1
        k = self.sampling.logprobs
        for i, row in enumerate(rows):
            base = dict(prompt_id=row["prompt_id"], sample_index=row["sample_index"], seed=row["seed"],
                        model=self.spec.model_name, category=row.get("category"), prompt_text=texts[i],
                        engine_node=self.node)
            out = by_row.get(i)
            if out is None:
                cols.add(**base, error=errors[i], prompt_tokens=len(ids[i]) if ids[i] else None)
                continue
            c = out.outputs[0]
            token_ids = list(c.token_ids)
            text = c.text if self.detokenize else texts_out[i]
            span = spans[i]
            topk_ids = topk_lps = sampled = None
            if k > 0 and c.logprobs is not None:
                topk_ids, topk_lps, sampled = topk_columns(c.logprobs, k, token_ids)
            cols.add(**base, output_text=text, output_token_ids=token_ids, output_logprobs=sampled,
                     topk_token_ids=topk_ids, topk_logprobs=topk_lps, finish_reason=c.finish_reason,
                     prompt_tokens=len(out.prompt_token_ids), output_tokens=len(token_ids),
                     engine_time_s=elapsed * work[i] / total_work, thinking_tokens=span.thinking_tokens,
                     answer_tokens=None if span.thinking_tokens is None else len(token_ids) - span.thinking_tokens,
                     thinking_finished=span.finished, answer_offset=span.answer_offset,
                     choice_logprobs=options.get(i, (None, None))[0], choice_chars=options.get(i, (None, None))[1])
        return check_rows(self.spec.model_name, batch, cols.table())

    def _options(self, rows: list[dict], texts: list, ids: list, done: list[int], solo: bool) -> tuple[dict, float]:
        """Multiple choice by likelihood for the batch's sample-0 rows with choices
        (cousins/engine/choices.py): ({row: (log-likelihoods, characters)}, engine seconds). A
        batch vLLM refuses leaves its rows without choice figures, not failed."""
        with self.feeder.turn():
            keys, inputs = choices.requests(self.tokenizer, rows, texts, ids, done, target=self.spec.choice_target,
                                            prompt_format=self.spec.prompt_format,
                                            max_model_len=self.spec.max_model_len)
        if not keys:
            return {}, 0.0
        try:
            outs, t = self.feeder.run([{"prompt_token_ids": x} for x in inputs], self.choice_params, solo)
        except (ValueError, TypeError):
            return {}, 0.0
        failed = {k[0] for k, o in zip(keys, outs) if getattr(o, "error", None)}  # (an endpoint's request)
        kept = [(k, x, o) for k, x, o in zip(keys, inputs, outs) if k[0] not in failed]
        return choices.loglikelihoods(*map(list, zip(*kept))) if kept else {}, t

    def _span(self, ids: list[int], text: str, prompt_text: str | None) -> thinking.Span:
        """The output's thinking span (cousins/engine/thinking.py), split here where the ids are."""
        return thinking.split(
            ids, text, self.markers, opened=thinking.opens_in_prompt(prompt_text, self.markers),
            count=lambda t: len(self.tokenizer.encode(t, add_special_tokens=False)),
            decode=lambda x: self.tokenizer.decode(x, skip_special_tokens=True))

    def _generate(self, prompt_ids: list[list[int]], seeds: list[int], errors: list, todo: list[int],
                  solo: bool = False, messages: list | None = None):
        """Generate a batch -> (outputs, engine seconds); if vLLM refuses it, retry row by row so
        one bad row fails alone. `messages`: each prompt's, for a chat endpoint."""
        prompts = [{"prompt_token_ids": p} for p in prompt_ids]
        for prompt, m in zip(prompts, messages or []):
            prompt["messages"] = m
        try:
            return self.feeder.run(prompts, [self._params(s) for s in seeds], solo)
        except (ValueError, TypeError):
            pass
        outputs, elapsed = [], 0.0
        for p, s, i in zip(prompts, seeds, todo):
            try:
                out, t = self.feeder.run([p], [self._params(s)], solo)
                outputs.append(out[0])
                elapsed += t
            except (ValueError, TypeError) as e:
                errors[i] = f"{type(e).__name__}: {e}"
                outputs.append(None)
        return outputs, elapsed


def _or_error(out, errors: list, i: int):
    """`out`, or None with its row's error set where it is a failed request (an endpoint's: its
    status and the server's message; a local engine's outputs never carry one)."""
    reason = getattr(out, "error", None) if out is not None else None
    if reason:
        errors[i] = reason
        return None
    return out


class ScoreActor(EngineRunner):
    """Teacher-forced scoring: one model's distribution at every output position of the ORIGINAL's
    generations (vLLM prompt logprobs over prompt + output, nothing sampled). One SCORES row per
    input row; rows the original failed on, or that do not fit the context, are error rows."""

    def __init__(self, spec: EngineSpec, topk: int, ledger=None, tolerate_load_failure: bool = False,
                 backend=None, engine: EngineActor | None = None):
        """`engine`: an EngineActor of the same model whose engine this one shares (BothActor)."""
        self.spec, self.topk, self.ledger = spec, topk, ledger
        backend = engine.backend if engine else backend_for(spec, backend)
        if engine is not None:
            self.llm, self.load_error = engine.llm, engine.load_error
        else:
            self.llm, self.load_error = load_engine(spec, backend, ledger, tolerate_load_failure)
        if self.llm is not None:
            self.params = backend.params(max_tokens=1, temperature=0.0, prompt_logprobs=topk, detokenize=False,
                                         flat_logprobs=True)
            self.tokenizer = engine.tokenizer if engine else self.llm.get_tokenizer()
            self.feeder = engine.feeder if engine else Feeder(self.llm, lora=lora_request(backend, spec))
        self.actor = f"{node_id()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.run_batch(ledger_key(self.spec.model_name, SCORE), batch, self._rows, self._failed_rows)[0]

    def _failed_rows(self, batch: pa.Table, reason: str) -> pa.Table:
        n = batch.num_rows
        cols = {f.name: [None] * n for f in schema.SCORES}
        cols.update(prompt_id=batch.column("prompt_id").to_pylist(),
                    sample_index=batch.column("sample_index").to_pylist(), model=[self.spec.model_name] * n,
                    error=[reason] * n)
        return check_rows(self.spec.model_name, batch, pa.Table.from_pydict(cols, schema=schema.SCORES))

    def _encode(self, texts: list[str]) -> list[list[int]]:
        with self.feeder.turn():  # once for the batch, not between every engine step
            return [templates.encode(self.tokenizer, text, prompt_format=self.spec.prompt_format) for text in texts]

    def _rows(self, batch: pa.Table, solo: bool = False) -> tuple[pa.Table, int]:
        rows = batch.select(SCORE_INPUT).to_pylist()
        cols: dict[str, list] = {f.name: [] for f in schema.SCORES}
        todo, inputs, errors = teacher_forced_inputs(rows, self.load_error, self._encode, self.spec.max_model_len)
        outs, elapsed = (self.feeder.run([{"prompt_token_ids": x} for x in inputs], self.params, solo)
                         if inputs else ([], 0.0))
        total = sum(len(x) for x in inputs) or 1
        scored = {i: (o, x) for i, o, x in zip(todo, outs, inputs) if _or_error(o, errors, i) is not None}
        for i, row in enumerate(rows):
            cols["prompt_id"].append(row["prompt_id"])
            cols["sample_index"].append(row["sample_index"])
            cols["model"].append(self.spec.model_name)
            if i not in scored:
                for name in ("topk_token_ids", "topk_logprobs", "token_logprobs", "engine_time_s"):
                    cols[name].append(None)
                cols["error"].append(errors[i])
                continue
            out, ids = scored[i]
            y = list(row["output_token_ids"])
            start = len(ids) - len(y)
            top_ids, top_lps, own = topk_columns(out.prompt_logprobs, self.topk, y, start)
            cols["topk_token_ids"].append(top_ids)
            cols["topk_logprobs"].append(top_lps)
            cols["token_logprobs"].append(own)
            cols["engine_time_s"].append(elapsed * len(ids) / total)
            cols["error"].append(None)
        table = check_rows(self.spec.model_name, batch, pa.Table.from_pydict(cols, schema=schema.SCORES))
        return table, sum(len(x) for x in inputs)


class BothActor:
    """One engine for both of a model's jobs in a drift run: generating its own rows and scoring
    the original's outputs (one engine start instead of two). Batches hold rows of either kind
    (column TASK); each kind goes through its own actor logic (the ledger counts them apart, as
    `model` and `score:model`) on the shared engine and feeder."""

    def __init__(self, spec: EngineSpec, sampling: Sampling, topk: int, ledger=None,
                 tolerate_load_failure: bool = False, backend=None):
        self.gen = EngineActor(spec, sampling, ledger, tolerate_load_failure, backend)
        self.score = ScoreActor(spec, topk, ledger, tolerate_load_failure, engine=self.gen)

    def __call__(self, batch: pa.Table) -> pa.Table:
        task = batch.column(TASK)
        out = [BOTH_OUT.empty_table()]
        for kind, actor in (("gen", self.gen), ("score", self.score)):
            part = batch.filter(pc.equal(task, kind))
            if part.num_rows:
                out.append(as_output(actor(part), kind))
        return pa.concat_tables(out)


class SelfScoringActor(EngineActor):
    """The original's generation pass emitting its scores too. What a separate scoring pass would
    compute for the original (the original's own distribution at each of its output positions,
    raw logprobs, the sampled token's logprob) is what this pass already holds when it asks vLLM
    for max(sampling.logprobs, topk) logprobs a position: each row comes out twice, as a
    generation row (its top-k cut to sampling.logprobs, as a plain pass stores it) and as a score
    row (top-`topk`, the sampled tokens' logprobs, no engine time of its own)."""

    def __init__(self, spec: EngineSpec, sampling: Sampling, topk: int, ledger=None,
                 tolerate_load_failure: bool = False, backend=None):
        self.stored_k, self.score_k = sampling.logprobs, topk
        super().__init__(spec, dataclasses.replace(sampling, logprobs=max(sampling.logprobs, topk)), ledger,
                         tolerate_load_failure, backend)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = super().__call__(batch)
        ok = pc.is_null(rows.column("error"))
        score = pa.table({
            "prompt_id": rows.column("prompt_id"), "sample_index": rows.column("sample_index"),
            "model": rows.column("model"), "topk_token_ids": trim_topk(rows.column("topk_token_ids"), self.score_k),
            "topk_logprobs": trim_topk(rows.column("topk_logprobs"), self.score_k),
            "token_logprobs": rows.column("output_logprobs"),
            "engine_time_s": pa.array([0.0] * rows.num_rows, pa.float64()),
            "error": pc.if_else(ok, pa.scalar(None, pa.string()),
                                pa.scalar("the original has no output here to score", pa.string()))})
        if self.stored_k == 0:
            gen = rows.set_column(rows.schema.get_field_index("output_logprobs"), schema.GENERATIONS.field(
                "output_logprobs"), pa.nulls(rows.num_rows, schema.GENERATIONS.field("output_logprobs").type))
            for c in ("topk_token_ids", "topk_logprobs"):
                gen = gen.set_column(gen.schema.get_field_index(c), schema.GENERATIONS.field(c),
                                     pa.nulls(rows.num_rows, schema.GENERATIONS.field(c).type))
        else:
            gen = rows
            for c in ("topk_token_ids", "topk_logprobs"):
                gen = gen.set_column(gen.schema.get_field_index(c), schema.GENERATIONS.field(c),
                                     trim_topk(rows.column(c), self.stored_k))
        return pa.concat_tables([as_output(gen, "gen"), as_output(score.cast(schema.SCORES), "score")])
