"""The engine stage: the only module that imports vLLM.

`generate(prompts, ...)` expands every prompt into `samples` rows, each with its own seed, and
shards them across a pool of engine actors (Ray Data `map_batches` with an `ActorPoolStrategy`).
Each actor holds one in-process vLLM engine, warmed up at load and fed by two batches at once
(`_Feeder`), and returns exactly one GENERATIONS row per input row: a row the engine cannot take
(a prompt longer than the context, a template that fails) becomes an error row with the reason,
and the rest of its batch still generates. An engine that dies is an error of the job, not of a
row.

Logprobs are vLLM's raw model logprobs (before temperature and top-p), the distribution a student
distils from: for each generated token, the top-k (token id, logprob) pairs sorted by rank, plus
the sampled token's own logprob (which may lie outside the top-k when sampling).
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from cousins import schema

# In-process engine: starts in ~3 s instead of 25-60 s, and keeps one process per actor.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}


@dataclass(frozen=True)
class EngineSpec:
    """What an engine actor needs to start: the model and the engine settings (picklable)."""

    model_name: str
    model_path: str
    dtype: str
    quantization: str | None
    max_model_len: int
    kv_cache_bytes: int
    tensor_parallel_size: int
    max_num_seqs: int
    enforce_eager: bool
    max_logprobs: int


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    logprobs: int
    stop: tuple[str, ...] = ()


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


def _topk(position_logprobs: dict, k: int) -> tuple[list[int], list[float]]:
    """The k best (token id, logprob) of one position, by vLLM's rank (1 = best)."""
    ranked = sorted(position_logprobs.items(), key=lambda kv: (kv[1].rank, kv[0]))[:k]
    return [tid for tid, _ in ranked], [lp.logprob for _, lp in ranked]


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _load(spec: EngineSpec, ledger, tolerate_failure: bool):
    """(the vLLM engine, None), or (None, the reason) when loading fails and that is tolerated."""
    os.environ.update(ENGINE_ENV)
    from vllm import LLM

    try:
        llm = LLM(
            model=spec.model_path,
            tokenizer=spec.model_path,
            dtype=spec.dtype,
            quantization=spec.quantization,
            max_model_len=spec.max_model_len,
            kv_cache_memory_bytes=spec.kv_cache_bytes,
            tensor_parallel_size=spec.tensor_parallel_size,
            distributed_executor_backend="uni" if spec.tensor_parallel_size == 1 else "ray",
            max_num_seqs=spec.max_num_seqs,
            enforce_eager=spec.enforce_eager,
            max_logprobs=spec.max_logprobs,
            logprobs_mode="raw_logprobs",
            seed=0,
        )
        _warm_up(llm, spec)
    except Exception as e:  # noqa: BLE001 - reported as the model's row errors when tolerated
        if not tolerate_failure:
            raise
        return None, f"engine failed to load {spec.model_name!r} from {spec.model_path}: {type(e).__name__}: {e}"[:2000]
    if ledger is not None:
        import ray

        ray.get(ledger.engine_started.remote(spec.model_name))
    return llm, None


def _warm_up(llm, spec: EngineSpec) -> None:
    """One small call through everything a batch uses (sampling, top-k logprobs, prompt logprobs,
    several sequence lengths): the engine's first call pays one-off costs (≈3 s for the tiny
    model on CPU, a 96-row batch running at half speed) that belong to start-up, not to the
    first batch of rows."""
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    base = tok.encode("warm up the engine " * 8, add_special_tokens=False) or [0]
    longest = max(1, min(len(base), spec.max_model_len // 2 - 8))
    prompts = [{"prompt_token_ids": base[:max(1, longest * (i + 1) // 8)]} for i in range(8)]
    k = max(1, min(20, spec.max_logprobs))
    llm.generate(prompts, SamplingParams(max_tokens=8, logprobs=k, prompt_logprobs=k, ignore_eos=True, seed=0),
                 use_tqdm=False)


class _Feeder:
    """One vLLM engine fed by several batches at once. Ray Data hands an actor its next batch
    while the current one is still generating (`BATCHES_IN_FLIGHT` calls run in the actor's
    threads); each call enqueues its requests, and whichever call holds the lock steps the engine
    for everybody, so the engine's batch stays full across Ray Data's batch boundaries (one
    batch's stragglers share steps with the next batch's prompts) and one batch's Arrow
    conversion overlaps the next one's generation. Each step's time is split evenly over the
    calls with requests in it: `run` returns the engine seconds its batch was charged."""

    def __init__(self, llm):
        import threading

        self.llm, self.lock = llm, threading.Lock()
        self.finished: dict[str, Any] = {}  # request id -> its final output, until its call takes it
        self.owner: dict[str, object] = {}  # request id -> the call that enqueued it
        self.pending: dict[object, int] = {}  # call -> its requests not finished yet
        self.charged: dict[object, float] = {}  # call -> engine seconds so far
        self.most_calls = 0  # the most calls seen in the engine at once
        self.arriving = 0  # calls waiting for the lock to tokenize or enqueue; the step loop yields to them
        self._count = threading.Lock()

    @contextmanager
    def turn(self):
        """The engine lock for work between steps: enqueueing, and the actor's own tokenizing (the
        engine detokenizes inside step() with stop strings, and HF fast tokenizers are not safe to
        share across threads). A thread stepping the engine lets such a caller in before its next
        step; Python's lock is not fair, and the stepping thread would otherwise win it back."""
        with self._count:
            self.arriving += 1
        try:
            self.lock.acquire()
        finally:
            with self._count:
                self.arriving -= 1
        try:
            yield
        finally:
            self.lock.release()

    def run(self, prompts: list, params) -> tuple[list, float]:
        """(RequestOutputs in the order of `prompts`, engine seconds charged to this call)."""
        if not prompts:
            return [], 0.0
        me = object()
        with self.turn():  # vLLM aborts what it added if one prompt is refused, and raises
            # outputs carry the LLM's own request ids; enqueue returns the engine's ("<id>-<8 random>")
            ids = [i.rsplit("-", 1)[0] for i in self.llm.enqueue(prompts, params, use_tqdm=False)]
            self.owner.update((i, me) for i in ids)
            self.pending[me], self.charged[me] = len(ids), 0.0
            self.most_calls = max(self.most_calls, len(self.pending))
        try:
            while True:
                with self.lock:
                    if not self.pending[me]:
                        return [self.finished.pop(i) for i in ids], self.charged[me]
                    engine = self.llm.llm_engine
                    if not engine.has_unfinished_requests():
                        raise RuntimeError("the engine dropped requests it had accepted")
                    active = [c for c, n in self.pending.items() if n]
                    t0 = time.perf_counter()
                    outputs = engine.step()
                    share = (time.perf_counter() - t0) / len(active)
                    for c in active:
                        self.charged[c] += share
                    for out in outputs:
                        if out.finished and out.request_id in self.owner:
                            self.finished[out.request_id] = out
                            self.pending[self.owner.pop(out.request_id)] -= 1
                if self.arriving:
                    time.sleep(0.0005)  # let the waiting caller take the lock
        finally:
            with self.lock:
                for d in (self.pending, self.charged):
                    d.pop(me, None)
                for i in ids:
                    self.finished.pop(i, None)
                    self.owner.pop(i, None)


# Batches an engine actor works on at once (see _Feeder): two keep its engine full across batch
# boundaries; more would only queue rows in the actor.
BATCHES_IN_FLIGHT = 2


class EngineActor:
    """One vLLM engine; called by Ray Data with Arrow batches of expanded prompt rows."""

    def __init__(self, spec: EngineSpec, sampling: Sampling, ledger=None, tolerate_load_failure: bool = False):
        self.spec, self.sampling, self.ledger = spec, sampling, ledger
        self.llm, self.load_error = _load(spec, ledger, tolerate_load_failure)
        if self.llm is not None:
            from vllm import SamplingParams

            self._SamplingParams = SamplingParams
            self.tokenizer = self.llm.get_tokenizer()
            self.feeder = _Feeder(self.llm)
        # vLLM detokenizes every top-k logprob token of every position when it detokenizes (21
        # decodes a token at top-20: most of a small model's time on CPU). Only stop strings need
        # the engine's text; otherwise the actor decodes each finished output once.
        self.detokenize = bool(sampling.stop)
        self.node = _node_id()
        self.actor = f"{self.node}:{os.getpid()}"  # for the ledger's per-actor working windows

    def _params(self, seed: int):
        s = self.sampling
        return self._SamplingParams(
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
            max_tokens=s.max_tokens, logprobs=s.logprobs if s.logprobs > 0 else None,
            seed=int(seed), stop=list(s.stop) or None, detokenize=self.detokenize,
        )

    def _prepare(self, messages: list[dict]) -> tuple[str, list[int]]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= self.spec.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; engine.max_model_len is {self.spec.max_model_len}")
        return text, ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.ledger is not None:
            from cousins.ledger import batch_key

            self.ledger.batch_started.remote(self.spec.model_name, batch_key(batch), batch.num_rows, self.actor)
        rows = batch.to_pylist()
        cols = _Columns()
        if self.llm is None:  # a cousin that failed to load fails its own rows, with the reason
            for row in rows:
                cols.add(prompt_id=row["prompt_id"], sample_index=row["sample_index"], seed=row["seed"],
                         model=self.spec.model_name, category=row.get("category"), engine_node=self.node,
                         error=self.load_error)
            return cols.table()
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
        outputs, elapsed = self._generate([ids[i] for i in todo], [rows[i]["seed"] for i in todo], errors, todo)

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
                pairs = [_topk(pos, k) for pos in c.logprobs]
                topk_ids = [p[0] for p in pairs]
                topk_lps = [p[1] for p in pairs]
                sampled = [pos[t].logprob for pos, t in zip(c.logprobs, token_ids)]
            cols.add(**base, output_text=text, output_token_ids=token_ids, output_logprobs=sampled,
                     topk_token_ids=topk_ids, topk_logprobs=topk_lps, finish_reason=c.finish_reason,
                     prompt_tokens=len(out.prompt_token_ids), output_tokens=len(token_ids),
                     engine_time_s=elapsed * work[i] / total_work)
        table = cols.table()
        assert table.num_rows == batch.num_rows, "the engine stage must return one row per input row"
        if self.ledger is not None:
            from cousins.ledger import peak_rss_bytes

            self.ledger.batch_done.remote(self.spec.model_name, peak_rss_bytes(), self.actor,
                                          sum(x or 0 for x in table.column("output_tokens").to_pylist()))
        return table

    def _generate(self, prompt_ids: list[list[int]], seeds: list[int], errors: list, todo: list[int]):
        """Generate a batch -> (outputs, engine seconds); if vLLM refuses it, retry row by row so
        one bad row fails alone."""
        prompts = [{"prompt_token_ids": p} for p in prompt_ids]
        try:
            return self.feeder.run(prompts, [self._params(s) for s in seeds])
        except (ValueError, TypeError):
            pass
        outputs, elapsed = [], 0.0
        for p, s, i in zip(prompts, seeds, todo):
            try:
                out, t = self.feeder.run([p], [self._params(s)])
                outputs.append(out[0])
                elapsed += t
            except (ValueError, TypeError) as e:
                errors[i] = f"{type(e).__name__}: {e}"
                outputs.append(None)
        return outputs, elapsed


class ScoreActor:
    """Teacher-forced scoring: one model's distribution at every output position of the ORIGINAL's
    generations (vLLM prompt logprobs over prompt + output, nothing sampled). One SCORES row per
    input row; rows the original failed on, or that do not fit the context, are error rows."""

    def __init__(self, spec: EngineSpec, topk: int, ledger=None, tolerate_load_failure: bool = False):
        self.spec, self.topk, self.ledger = spec, topk, ledger
        self.llm, self.load_error = _load(spec, ledger, tolerate_load_failure)
        if self.llm is not None:
            from vllm import SamplingParams

            self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=topk, detokenize=False)
            self.tokenizer = self.llm.get_tokenizer()
            self.feeder = _Feeder(self.llm)
        self.actor = f"{_node_id()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.ledger is not None:
            from cousins.ledger import batch_key

            self.ledger.batch_started.remote(f"score:{self.spec.model_name}", batch_key(batch), batch.num_rows,
                                             self.actor)
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
                encoded = [self.tokenizer.encode(rows[i]["prompt_text"], add_special_tokens=False) for i in todo]
        fits = []
        for i, prompt_ids in zip(todo, encoded):
            ids = prompt_ids + list(rows[i]["output_token_ids"])
            if len(ids) + 1 > self.spec.max_model_len:
                errors[i] = f"prompt + output is {len(ids)} tokens; scoring needs engine.max_model_len > that"
            else:
                fits.append(i), inputs.append(ids)
        todo = fits
        outs, elapsed = self.feeder.run([{"prompt_token_ids": x} for x in inputs], self.params) if inputs else ([], 0.0)
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
            positions = out.prompt_logprobs[start:start + len(y)]
            pairs = [_topk(pos, self.topk) for pos in positions]
            cols["topk_token_ids"].append([p[0] for p in pairs])
            cols["topk_logprobs"].append([p[1] for p in pairs])
            cols["token_logprobs"].append([pos[t].logprob for pos, t in zip(positions, y)])
            cols["engine_time_s"].append(elapsed * len(ids) / total)
            cols["error"].append(None)
        if self.ledger is not None:
            from cousins.ledger import peak_rss_bytes

            self.ledger.batch_done.remote(f"score:{self.spec.model_name}", peak_rss_bytes(), self.actor,
                                          sum(len(x) for x in inputs))
        return pa.Table.from_pydict(cols, schema=schema.SCORES)


def _pool(rows, actor, kwargs: dict, *, num_actors: int, cpus_per_actor: float, gpus_per_actor: float,
          batch_size: int):
    from ray.data import ActorPoolStrategy

    return rows.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        # Two batches run in each actor's threads at once, feeding its one engine (see _Feeder).
        compute=ActorPoolStrategy(size=num_actors, max_concurrent_calls_per_actor=BATCHES_IN_FLIGHT,
                                  enable_true_multi_threading=True),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        runtime_env={"env_vars": ENGINE_ENV},
    )


def generate(rows, *, spec: EngineSpec, sampling: Sampling, ledger=None, tolerate_load_failure: bool = False,
             **placement):
    """Expanded prompt rows (expand_samples) -> generations (schema.GENERATIONS rows), lazily.
    placement: num_actors, cpus_per_actor, gpus_per_actor, batch_size."""
    return _pool(rows, EngineActor, {"spec": spec, "sampling": sampling, "ledger": ledger,
                                     "tolerate_load_failure": tolerate_load_failure}, **placement)


def score(rows, *, spec: EngineSpec, topk: int, ledger=None, tolerate_load_failure: bool = False, **placement):
    """The original's generation rows -> `spec`'s teacher-forced scores (schema.SCORES rows), lazily."""
    return _pool(rows, ScoreActor, {"spec": spec, "topk": topk, "ledger": ledger,
                                    "tolerate_load_failure": tolerate_load_failure}, **placement)
