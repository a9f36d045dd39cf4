"""The engine stage: rows in, exactly one row out per row in, on a pool of engine actors.

`generate(rows, ...)` shards expanded prompt rows (`expand_samples`: each prompt x sample with its
own seed) across a pool of `EngineActor`s (Ray Data `map_batches` with an `ActorPoolStrategy`);
`score(rows, ...)` runs the original's outputs through `ScoreActor`s, teacher-forced. Each actor
holds one engine (cousins/engine/backend.py), fed by two batches at once (cousins/engine/feeder.py), and returns
exactly one row per input row in input order (checked: `EngineContractError` names the model and the
batch). A row the engine cannot take (a prompt longer than the context, a template that fails)
becomes an error row with the reason, and the rest of its batch still runs. An engine that dies is
an error of the job, not of a row.

Logprobs are vLLM's raw model logprobs (before temperature and top-p), the distribution a student
distils from: for each generated token, the top-k (token id, logprob) pairs sorted by rank, plus
the sampled token's own logprob (which may lie outside the top-k when sampling).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cousins.contract import schema
from cousins.engine import templates
from cousins.engine.backend import ENGINE_ENV, EngineSpec, Placement, Sampling, VllmBackend, sampling_kwargs
from cousins.engine.feeder import BATCHES_IN_FLIGHT, EngineBroken, Feeder
from cousins.engine.placement import pool_args
from cousins.run.runtime import engine_env

class EngineContractError(RuntimeError):
    """An engine actor broke the one-row-out-per-row-in rule: a bug, never a row's error."""


def check_rows(model: str, batch: pa.Table, out: pa.Table) -> pa.Table:
    """`out` if it holds exactly one row per row of `batch`, keys in the same order."""
    if out.num_rows != batch.num_rows or schema.row_keys(out) != schema.row_keys(batch):
        from cousins.run.ledger import batch_key

        raise EngineContractError(f"model {model!r}, batch {batch_key(batch)}: {out.num_rows} rows out for "
                                  f"{batch.num_rows} in (or in another order); an engine stage returns one "
                                  f"row per input row")
    return out


def row_seed(base_seed: int, prompt_id: str, sample_index: int) -> int:
    """The seed of one (prompt, sample): independent of batching, order and sharding."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def expand_samples(batch: pa.Table, *, samples: int, base_seed: int) -> pa.Table:
    """Each prompt row -> `samples` rows with sample_index and seed (Arrow in, Arrow out)."""
    n = batch.num_rows
    take = np.repeat(np.arange(n), samples)
    out = batch.take(pa.array(take))
    sample_index = np.tile(np.arange(samples, dtype=np.int32), n)
    ids = out.column("prompt_id").to_pylist()
    seeds = [row_seed(base_seed, pid, int(s)) for pid, s in zip(ids, sample_index)]
    return out.append_column("sample_index", pa.array(sample_index, pa.int32())).append_column(
        "seed", pa.array(seeds, pa.int64()))


class _Columns:
    """Accumulates GENERATIONS rows column by column, typed, without per-row dicts."""

    def __init__(self):
        self.cols: dict[str, list] = {f.name: [] for f in schema.GENERATIONS}

    def add(self, **values: Any) -> None:
        for name, col in self.cols.items():
            col.append(values.get(name))

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.cols, schema=schema.GENERATIONS)


def _rank(entries, k: int) -> tuple[list[int], list[float]]:
    """The k best of one position's (token id, rank, logprob) entries by vLLM's rank (1 = best),
    a token listed twice (the position's own token, and again in the top-k) counted once."""
    best = {tid: (rank, lp) for tid, rank, lp in entries}
    ranked = sorted(best.items(), key=lambda kv: (kv[1][0], kv[0]))[:k]
    return [tid for tid, _ in ranked], [v[1] for _, v in ranked]


def _topk(position_logprobs: dict, k: int) -> tuple[list[int], list[float]]:
    """The k best (token id, logprob) of one position given as vLLM's dict of Logprob."""
    return _rank(((tid, lp.rank, lp.logprob) for tid, lp in position_logprobs.items()), k)


def topk_columns(logprobs, k: int, tokens: list[int], start: int = 0) -> tuple[list, list, list]:
    """Per position start.. of a vLLM logprobs result, one per token of `tokens` (the sampled or
    teacher-forced token there): the k best token ids and logprobs by vLLM's rank, and the token's
    own logprob. `logprobs` is a dict per position, or vLLM's FlatLogprobs (flat_logprobs=True),
    where each position holds the position's token first, then ranks 1.. in order: read by slicing,
    with no dict or sort per position (a tenth of the engine actor's time at top-20 on CPU)."""
    if not hasattr(logprobs, "start_indices"):
        positions = logprobs[start:start + len(tokens)]
        pairs = [_topk(pos, k) for pos in positions]
        return [p[0] for p in pairs], [p[1] for p in pairs], [pos[t].logprob for pos, t in zip(positions, tokens)]
    first, last, ids, lps, ranks = (logprobs.start_indices, logprobs.end_indices, logprobs.token_ids,
                                    logprobs.logprobs, logprobs.ranks)
    top_ids, top_lps, own = [], [], []
    for i, t in enumerate(tokens, start):
        a, b = first[i], last[i]
        if ids[a] != t or (b > a + 1 and ranks[a + 1] != 1):  # not the layout above: rank them
            best_ids, best_lps = _rank(zip(ids[a:b], ranks[a:b], lps[a:b]), k)
            top_ids.append(best_ids), top_lps.append(best_lps)
            own.append(lps[a + ids[a:b].index(t)])
            continue
        top_ids.append(ids[a + 1:min(b, a + 1 + k)]), top_lps.append(lps[a + 1:min(b, a + 1 + k)])
        own.append(lps[a])
    return top_ids, top_lps, own


def lora_request(backend, spec: EngineSpec):
    """The LoRA adapter request of `spec`'s engine, if it serves one (a backend without adapters: None)."""
    get = getattr(backend, "lora_request", None)
    return get(spec) if get is not None and spec.lora else None


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _load(spec: EngineSpec, backend, ledger, tolerate_failure: bool):
    """(the engine, None), or (None, the reason) when loading fails and that is tolerated."""
    began = time.time()
    try:
        llm = backend.load(spec)
    except Exception as e:  # noqa: BLE001 - reported as the model's row errors when tolerated
        if not tolerate_failure:
            raise
        return None, f"engine failed to load {spec.model_name!r} from {spec.model_path}: {type(e).__name__}: {e}"[:2000]
    if ledger is not None:
        import ray

        ray.get(ledger.engine_started.remote(spec.model_name, began, time.time()))
    return llm, None


def _begin(ledger, name: str, batch: pa.Table, actor: str) -> str:
    """Tell the ledger a batch begins (retries and working windows); its key, for `_end`."""
    from cousins.run.ledger import batch_key

    key = batch_key(batch)
    if ledger is not None:
        ledger.batch_started.remote(name, key, batch.num_rows, actor)
    return key


def _end(ledger, name: str, key: str | None, table: pa.Table, actor: str, tokens: int, engine_ran: bool) -> None:
    """Tell the ledger a batch is done: its rows, error rows and tokens (the stage's progress), and
    when an engine ran it, its working window and memory."""
    if ledger is None:
        return
    from cousins.run.ledger import peak_rss_bytes

    if engine_ran:
        ledger.batch_done.remote(name, peak_rss_bytes(), actor, tokens)
    ledger.rows_done.remote(name, key, table.num_rows, table.num_rows - table.column("error").null_count, tokens)


def _exit_process(reason: str) -> None:
    """End this engine actor's process: Ray starts a fresh one (a fresh engine) and Ray Data sends
    it the batches this one had (max_restarts / max_task_retries of the actor pool)."""
    import sys

    print(f"engine actor {os.getpid()} exits for a fresh engine: {reason}", file=sys.stderr, flush=True)
    os._exit(1)


class EngineRunner:
    """What both engine actors do around a batch: the ledger, and an engine that breaks.

    An error raised while the engine steps (not a prompt it refuses: those are row errors) leaves
    the engine unusable. The first time a batch is in an engine that breaks, the actor exits: Ray
    restarts it with a fresh engine and Ray Data sends the batch again. A batch that broke an
    engine before runs alone on the fresh one; if it breaks that too, its rows become error rows
    with the engine's reason (the run goes on and counts them), and the actor exits before its
    next batch. Outside Ray (tests) `die` raises instead of exiting."""

    ledger = None
    retire = False  # this engine broke on a batch that then became error rows: no further batch here

    def _die(self, reason: str) -> None:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            _exit_process(reason)
        raise RuntimeError(f"engine broken: {reason}")

    def _breaks(self, name: str, key: str, reason: str | None = None, stepping: bool = False) -> int:
        """How many engines broke with this batch in them (recording one more first when `reason`
        is given; `stepping`: this call ran the step that raised, so the engine is counted once):
        the ledger's count, shared by every actor of the pool and their restarts; a count of this
        process's own without a ledger."""
        import ray

        if self.ledger is not None:
            return ray.get(self.ledger.engine_broke.remote(name, key, reason, stepping) if reason is not None
                           else self.ledger.batch_breaks.remote(name, key))
        own = self.__dict__.setdefault("_own_breaks", {})
        if reason is not None:
            own[key] = own.get(key, 0) + 1
        return own.get(key, 0)

    def _broke(self, name: str, key: str, e: EngineBroken) -> str:
        """The reason for the batch's error rows when it broke an engine a second time (else exits).
        Every call that was in the engine records the break before any of them ends the process."""
        reason = f"{type(e.cause).__name__}: {e.cause}"[:1000]
        if not e.during:  # broken by another batch before this one came: a fresh engine takes it
            self._die(f"broken by an earlier batch ({reason})")
        breaks = self._breaks(name, key, reason, e.stepping)
        feeder = self.feeder  # (shared by a BothActor's two kinds of calls: one barrier for both)
        with feeder.recorded:
            feeder.records += 1
            feeder.recorded.notify_all()
        if breaks < 2:
            with feeder.recorded:  # a barrier: every call that was in the engine has recorded
                feeder.recorded.wait_for(lambda: feeder.records >= feeder.broken_with, timeout=30)
            self._die(reason)
        self.retire = True
        return f"the engine failed on this batch twice, the second time running it alone on a fresh engine: {reason}"

    def _run(self, name: str, batch: pa.Table, work, failed_rows) -> tuple[pa.Table, int]:
        """`work(batch, solo) -> (table, tokens)` with the ledger told; an engine break handled."""
        if self.retire:
            self._die("its engine broke on an earlier batch")
        key = _begin(self.ledger, name, batch, self.actor)
        solo = self.llm is not None and self._breaks(name, key) > 0
        try:
            table, tokens = work(batch, solo)
        except EngineBroken as e:
            table, tokens = failed_rows(batch, self._broke(name, key, e)), 0
        _end(self.ledger, name, key, table, self.actor, tokens, self.llm is not None)
        return table, tokens


class EngineActor(EngineRunner):
    """One vLLM engine; called by Ray Data with Arrow batches of expanded prompt rows."""

    def __init__(self, spec: EngineSpec, sampling: Sampling, ledger=None, tolerate_load_failure: bool = False,
                 backend=None):
        self.spec, self.sampling, self.ledger = spec, sampling, ledger
        self.backend = backend or VllmBackend()
        self.llm, self.load_error = _load(spec, self.backend, ledger, tolerate_load_failure)
        if self.llm is not None:
            self.tokenizer = self.llm.get_tokenizer()
            self.feeder = Feeder(self.llm, lora=lora_request(self.backend, spec))
        # vLLM detokenizes every top-k logprob token of every position when it detokenizes (21
        # decodes a token at top-20: most of a small model's time on CPU). Only stop strings need
        # the engine's text; otherwise the actor decodes each finished output once.
        self.detokenize = bool(sampling.stop)
        self.node = _node_id()
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
        return self._run(self.spec.model_name, batch, self._work, self._failed_rows)[0]

    def _work(self, batch: pa.Table, solo: bool) -> tuple[pa.Table, int]:
        table = self._rows(batch, solo)
        return table, sum(x or 0 for x in table.column("output_tokens").to_pylist())

    def _failed_rows(self, batch: pa.Table, reason: str) -> pa.Table:
        """Every row of the batch an error row with `reason`."""
        cols = _Columns()
        for row in batch.select(["prompt_id", "sample_index", "seed", "category"]).to_pylist():
            cols.add(prompt_id=row["prompt_id"], sample_index=row["sample_index"], seed=row["seed"],
                     model=self.spec.model_name, category=row.get("category"), engine_node=self.node, error=reason)
        return check_rows(self.spec.model_name, batch, cols.table())

    def _rows(self, batch: pa.Table, solo: bool = False) -> pa.Table:
        if self.llm is None:  # a cousin that failed to load fails its own rows, with the reason
            return self._failed_rows(batch, self.load_error)
        rows = batch.to_pylist()
        cols = _Columns()
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
        outputs, elapsed = self._generate([ids[i] for i in todo], [rows[i]["seed"] for i in todo], errors, todo, solo)

        by_row = dict(zip(todo, outputs))
        texts_out = {}
        if not self.detokenize:
            with self.feeder.turn():
                texts_out = {i: self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)
                             for i, o in by_row.items() if o is not None}
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
            topk_ids = topk_lps = sampled = None
            if k > 0 and c.logprobs is not None:
                topk_ids, topk_lps, sampled = topk_columns(c.logprobs, k, token_ids)
            cols.add(**base, output_text=text, output_token_ids=token_ids, output_logprobs=sampled,
                     topk_token_ids=topk_ids, topk_logprobs=topk_lps, finish_reason=c.finish_reason,
                     prompt_tokens=len(out.prompt_token_ids), output_tokens=len(token_ids),
                     engine_time_s=elapsed * work[i] / total_work)
        return check_rows(self.spec.model_name, batch, cols.table())

    def _generate(self, prompt_ids: list[list[int]], seeds: list[int], errors: list, todo: list[int],
                  solo: bool = False):
        """Generate a batch -> (outputs, engine seconds); if vLLM refuses it, retry row by row so
        one bad row fails alone."""
        prompts = [{"prompt_token_ids": p} for p in prompt_ids]
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


class ScoreActor(EngineRunner):
    """Teacher-forced scoring: one model's distribution at every output position of the ORIGINAL's
    generations (vLLM prompt logprobs over prompt + output, nothing sampled). One SCORES row per
    input row; rows the original failed on, or that do not fit the context, are error rows."""

    def __init__(self, spec: EngineSpec, topk: int, ledger=None, tolerate_load_failure: bool = False,
                 backend=None, engine: EngineActor | None = None):
        """`engine`: an EngineActor of the same model whose engine this one shares (BothActor)."""
        self.spec, self.topk, self.ledger = spec, topk, ledger
        backend = backend or (engine.backend if engine else VllmBackend())
        if engine is not None:
            self.llm, self.load_error = engine.llm, engine.load_error
        else:
            self.llm, self.load_error = _load(spec, backend, ledger, tolerate_load_failure)
        if self.llm is not None:
            self.params = backend.params(max_tokens=1, temperature=0.0, prompt_logprobs=topk, detokenize=False,
                                         flat_logprobs=True)
            self.tokenizer = engine.tokenizer if engine else self.llm.get_tokenizer()
            self.feeder = engine.feeder if engine else Feeder(self.llm, lora=lora_request(backend, spec))
        self.actor = f"{_node_id()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._run(f"score:{self.spec.model_name}", batch, self._rows, self._failed_rows)[0]

    def _failed_rows(self, batch: pa.Table, reason: str) -> pa.Table:
        n = batch.num_rows
        cols = {f.name: [None] * n for f in schema.SCORES}
        cols.update(prompt_id=batch.column("prompt_id").to_pylist(),
                    sample_index=batch.column("sample_index").to_pylist(), model=[self.spec.model_name] * n,
                    error=[reason] * n)
        return check_rows(self.spec.model_name, batch, pa.Table.from_pydict(cols, schema=schema.SCORES))

    def _rows(self, batch: pa.Table, solo: bool = False) -> tuple[pa.Table, int]:
        rows = batch.select(["prompt_id", "sample_index", "prompt_text", "output_token_ids", "error"]).to_pylist()
        cols: dict[str, list] = {f.name: [] for f in schema.SCORES}
        todo, inputs, errors = [], [], [None] * len(rows)
        for i, row in enumerate(rows):
            if self.llm is None:
                errors[i] = self.load_error
            elif row["error"] is not None or not row["output_token_ids"]:
                errors[i] = "the original has no output here to score"
            else:
                todo.append(i)
        encoded = []
        if todo:
            with self.feeder.turn():  # once for the batch, not between every engine step
                # The original's rendered prompt (check_templates: the same ids as this model's own render)
                encoded = [templates.encode(self.tokenizer, rows[i]["prompt_text"], prompt_format=self.spec.prompt_format)
                           for i in todo]
        fits = []
        for i, prompt_ids in zip(todo, encoded):
            ids = prompt_ids + list(rows[i]["output_token_ids"])
            if len(ids) + 1 > self.spec.max_model_len:
                errors[i] = f"prompt + output is {len(ids)} tokens; scoring needs engine.max_model_len > that"
            else:
                fits.append(i), inputs.append(ids)
        todo = fits
        outs, elapsed = (self.feeder.run([{"prompt_token_ids": x} for x in inputs], self.params, solo)
                         if inputs else ([], 0.0))
        total = sum(len(x) for x in inputs) or 1
        scored = dict(zip(todo, zip(outs, inputs)))
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


TASK = "_task"  # BothActor's input and output: "gen" rows to generate, "score" rows to score
SCORE_INPUT = ["prompt_id", "sample_index", "prompt_text", "output_token_ids", "error"]
BOTH_OUT = pa.schema([f.with_nullable(True) for f in (
    *schema.GENERATIONS, *[f for f in schema.SCORES if f.name not in schema.GENERATIONS.names],
    pa.field(TASK, pa.string()))])


_G = {f.name: f.type for f in schema.GENERATIONS}
BOTH_IN = pa.schema([f.with_nullable(True) for f in (
    *schema.PROMPTS, pa.field("sample_index", pa.int32()), pa.field("seed", pa.int64()),
    *[pa.field(c, _G[c]) for c in SCORE_INPUT if c not in ("prompt_id", "sample_index")],
    pa.field(TASK, pa.string()))])


def as_input(batch: pa.Table, *, task: str) -> pa.Table:
    """Expanded prompt rows ("gen") or the original's generation rows ("score") in BOTH_IN's shape,
    so both kinds travel in one Dataset to a BothActor."""
    n = batch.num_rows
    return pa.Table.from_arrays([pa.array([task] * n, pa.string()) if f.name == TASK else
                                 (batch.column(f.name).cast(f.type) if f.name in batch.column_names
                                  else pa.nulls(n, f.type)) for f in BOTH_IN], schema=BOTH_IN)


def _as_both(table: pa.Table, task: str) -> pa.Table:
    n = table.num_rows
    return pa.Table.from_arrays([pa.array([task] * n, pa.string()) if f.name == TASK else
                                 (table.column(f.name).cast(f.type) if f.name in table.column_names
                                  else pa.nulls(n, f.type)) for f in BOTH_OUT], schema=BOTH_OUT)


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
                out.append(_as_both(actor(part), kind))
        return pa.concat_tables(out)


def _trim(column: pa.ChunkedArray, k: int) -> pa.Array:
    """Each position's top-k list (list<list<...>>) cut to its first k (they are in rank order)."""
    outer = column.combine_chunks()
    if isinstance(outer, pa.ChunkedArray):  # (an all-null column of no chunks)
        outer = pa.nulls(0, column.type)
    inner = pc.list_slice(outer.flatten(), 0, k)
    return pa.ListArray.from_arrays(outer.offsets, inner, type=column.type, mask=outer.is_null())


class SelfScoringActor(EngineActor):
    """The original's generation pass emitting its scores too. What a separate scoring pass would
    compute for the original (the original's own distribution at each of its output positions,
    raw logprobs, the sampled token's logprob) is what this pass already holds when it asks vLLM
    for max(sampling.logprobs, topk) logprobs a position: each row comes out twice, as a
    generation row (its top-k cut to sampling.logprobs, as a plain pass stores it) and as a score
    row (top-`topk`, the sampled tokens' logprobs, no engine time of its own)."""

    def __init__(self, spec: EngineSpec, sampling: Sampling, topk: int, ledger=None,
                 tolerate_load_failure: bool = False, backend=None):
        import dataclasses

        self.stored_k, self.score_k = sampling.logprobs, topk
        super().__init__(spec, dataclasses.replace(sampling, logprobs=max(sampling.logprobs, topk)), ledger,
                         tolerate_load_failure, backend)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = super().__call__(batch)
        ok = pc.is_null(rows.column("error"))
        score = pa.table({
            "prompt_id": rows.column("prompt_id"), "sample_index": rows.column("sample_index"),
            "model": rows.column("model"), "topk_token_ids": _trim(rows.column("topk_token_ids"), self.score_k),
            "topk_logprobs": _trim(rows.column("topk_logprobs"), self.score_k),
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
                                     _trim(rows.column(c), self.stored_k))
        return pa.concat_tables([_as_both(gen, "gen"), _as_both(score.cast(schema.SCORES), "score")])


def _pool(rows, actor, kwargs: dict, placement: Placement):
    import warnings

    from ray.data import ActorPoolStrategy

    with warnings.catch_warnings():
        # ray_remote_args_fn (an engine of several GPUs: its placement group) is deprecated for Ray
        # 2.64 and is how ray.data.llm places such engines in the Ray this project pins.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
        out = rows.map_batches(
            actor,
            fn_constructor_kwargs=kwargs,
            batch_size=placement.batch_size,
            batch_format="pyarrow",
            # Two batches run in each actor's threads at once, feeding its one engine (see
            # cousins.engine.feeder), and no more are queued on it: Ray Data's default (twice that) let one
            # engine hold batches another one had nothing to do for, at the end of a stage above all.
            compute=ActorPoolStrategy(size=placement.num_actors, max_concurrent_calls_per_actor=BATCHES_IN_FLIGHT,
                                      max_tasks_in_flight_per_actor=BATCHES_IN_FLIGHT,
                                      enable_true_multi_threading=True),
            runtime_env={"env_vars": engine_env(ENGINE_ENV)},
            **pool_args(placement),  # CPUs and GPUs, or (several GPUs an engine) its placement group
        )
    # Every engine of the pool starts (loads its model) before the first batch is sent: otherwise
    # Ray Data hands the first actor ready as many batches as it takes, and on a small run an
    # engine that starts later (another node, an autoscaled one) may get nothing.
    out.context.wait_for_min_actors_s = placement.start_timeout_s
    return out


def generate(rows, *, spec: EngineSpec, sampling: Sampling, placement: Placement, ledger=None,
             tolerate_load_failure: bool = False, backend=None):
    """Expanded prompt rows (expand_samples) -> generations (schema.GENERATIONS rows), lazily."""
    return _pool(rows, EngineActor, {"spec": spec, "sampling": sampling, "ledger": ledger,
                                     "tolerate_load_failure": tolerate_load_failure, "backend": backend}, placement)


def generate_and_score(rows, *, spec: EngineSpec, sampling: Sampling, topk: int, placement: Placement, ledger=None,
                       tolerate_load_failure: bool = False, backend=None):
    """Rows of both kinds (TASK: "gen" expanded prompt rows, "score" the original's generation
    rows) -> BOTH_OUT rows (generations and scores, TASK says which), lazily, on one engine pool."""
    return _pool(rows, BothActor, {"spec": spec, "sampling": sampling, "topk": topk, "ledger": ledger,
                                   "tolerate_load_failure": tolerate_load_failure, "backend": backend}, placement)


def generate_self_scored(rows, *, spec: EngineSpec, sampling: Sampling, topk: int, placement: Placement,
                         ledger=None, backend=None):
    """The original's expanded prompt rows -> BOTH_OUT rows: its generations and its own scores."""
    return _pool(rows, SelfScoringActor, {"spec": spec, "sampling": sampling, "topk": topk, "ledger": ledger,
                                          "backend": backend}, placement)


def score(rows, *, spec: EngineSpec, topk: int, placement: Placement, ledger=None,
          tolerate_load_failure: bool = False, backend=None):
    """The original's generation rows -> `spec`'s teacher-forced scores (schema.SCORES rows), lazily."""
    return _pool(rows, ScoreActor, {"spec": spec, "topk": topk, "ledger": ledger,
                                    "tolerate_load_failure": tolerate_load_failure, "backend": backend}, placement)
