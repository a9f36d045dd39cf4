"""The engine stage: the only module that imports vLLM.

`generate(prompts, ...)` expands every prompt into `samples` rows, each with its own seed, and
shards them across a pool of engine actors (Ray Data `map_batches` with an `ActorPoolStrategy`).
Each actor holds one in-process vLLM engine and returns exactly one GENERATIONS row per input
row: a row the engine cannot take (a prompt longer than the context, a template that fails)
becomes an error row with the reason, and the rest of its batch still generates. An engine that
dies is an error of the job, not of a row.

Logprobs are vLLM's raw model logprobs (before temperature and top-p), the distribution a student
distils from: for each generated token, the top-k (token id, logprob) pairs sorted by rank, plus
the sampled token's own logprob (which may lie outside the top-k when sampling).
"""

from __future__ import annotations

import hashlib
import os
import time
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
    except Exception as e:  # noqa: BLE001 - reported as the model's row errors when tolerated
        if not tolerate_failure:
            raise
        return None, f"engine failed to load {spec.model_name!r} from {spec.model_path}: {type(e).__name__}: {e}"[:2000]
    if ledger is not None:
        import ray

        ray.get(ledger.engine_started.remote(spec.model_name))
    return llm, None


class EngineActor:
    """One vLLM engine; called by Ray Data with Arrow batches of expanded prompt rows."""

    def __init__(self, spec: EngineSpec, sampling: Sampling, ledger=None, tolerate_load_failure: bool = False):
        self.spec, self.sampling, self.ledger = spec, sampling, ledger
        self.llm, self.load_error = _load(spec, ledger, tolerate_load_failure)
        if self.llm is not None:
            from vllm import SamplingParams

            self._SamplingParams = SamplingParams
            self.tokenizer = self.llm.get_tokenizer()
        self.node = _node_id()

    def _params(self, seed: int):
        s = self.sampling
        return self._SamplingParams(
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
            max_tokens=s.max_tokens, logprobs=s.logprobs if s.logprobs > 0 else None,
            seed=int(seed), stop=list(s.stop) or None,
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

            self.ledger.batch_started.remote(self.spec.model_name, batch_key(batch), batch.num_rows)
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
        for row in rows:
            try:
                text, tok = self._prepare(row["messages"])
                texts.append(text), ids.append(tok), errors.append(None)
            except Exception as e:  # noqa: BLE001 - a row the engine cannot take is an error row
                texts.append(None), ids.append(None), errors.append(f"{type(e).__name__}: {e}")

        todo = [i for i, e in enumerate(errors) if e is None]
        t0 = time.perf_counter()
        outputs = self._generate([ids[i] for i in todo], [rows[i]["seed"] for i in todo], errors, todo)
        elapsed = time.perf_counter() - t0

        by_row = dict(zip(todo, outputs))
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
            topk_ids = topk_lps = sampled = None
            if k > 0 and c.logprobs is not None:
                pairs = [_topk(pos, k) for pos in c.logprobs]
                topk_ids = [p[0] for p in pairs]
                topk_lps = [p[1] for p in pairs]
                sampled = [pos[t].logprob for pos, t in zip(c.logprobs, token_ids)]
            cols.add(**base, output_text=c.text, output_token_ids=token_ids, output_logprobs=sampled,
                     topk_token_ids=topk_ids, topk_logprobs=topk_lps, finish_reason=c.finish_reason,
                     prompt_tokens=len(out.prompt_token_ids), output_tokens=len(token_ids),
                     engine_time_s=elapsed * work[i] / total_work)
        table = cols.table()
        assert table.num_rows == batch.num_rows, "the engine stage must return one row per input row"
        if self.ledger is not None:
            from cousins.ledger import peak_rss_bytes

            self.ledger.batch_done.remote(self.spec.model_name, peak_rss_bytes())
        return table

    def _generate(self, prompt_ids: list[list[int]], seeds: list[int], errors: list, todo: list[int]):
        """Generate a batch; if vLLM rejects it, retry row by row so one bad row fails alone."""
        if not prompt_ids:
            return []
        prompts = [{"prompt_token_ids": p} for p in prompt_ids]
        try:
            return self.llm.generate(prompts, [self._params(s) for s in seeds], use_tqdm=False)
        except (ValueError, TypeError):
            pass
        outputs = []
        for p, s, i in zip(prompts, seeds, todo):
            try:
                outputs.append(self.llm.generate([p], [self._params(s)], use_tqdm=False)[0])
            except (ValueError, TypeError) as e:
                errors[i] = f"{type(e).__name__}: {e}"
                outputs.append(None)
        return outputs


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

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.ledger is not None:
            from cousins.ledger import batch_key

            self.ledger.batch_started.remote(f"score:{self.spec.model_name}", batch_key(batch), batch.num_rows)
        rows = batch.select(["prompt_id", "sample_index", "prompt_text", "output_token_ids", "error"]).to_pylist()
        cols: dict[str, list] = {f.name: [] for f in schema.SCORES}
        todo, inputs, errors = [], [], [None] * len(rows)
        for i, row in enumerate(rows):
            if self.llm is None:
                errors[i] = self.load_error
            elif row["error"] is not None or not row["output_token_ids"]:
                errors[i] = "the original has no output here to score"
            else:
                ids = self.tokenizer.encode(row["prompt_text"], add_special_tokens=False) + list(row["output_token_ids"])
                if len(ids) + 1 > self.spec.max_model_len:
                    errors[i] = f"prompt + output is {len(ids)} tokens; scoring needs engine.max_model_len > that"
                else:
                    todo.append(i), inputs.append(ids)
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": x} for x in inputs], self.params, use_tqdm=False) if inputs else []
        elapsed = time.perf_counter() - t0
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

            self.ledger.batch_done.remote(f"score:{self.spec.model_name}", peak_rss_bytes())
        return pa.Table.from_pydict(cols, schema=schema.SCORES)


def _pool(rows, actor, kwargs: dict, *, num_actors: int, cpus_per_actor: float, gpus_per_actor: float,
          batch_size: int):
    from ray.data import ActorPoolStrategy

    return rows.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=num_actors),
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
