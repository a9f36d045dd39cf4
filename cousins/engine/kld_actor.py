"""The exact-KLD engine actor (`drift.kld=exact`): per-token KL(original ‖ cousin) over the whole vocabulary.

The top-k mode bounds KLD from the top-k lists both models store (cousins/drift/metrics.py); a
model whose mass lies outside its top-k makes that bound loose. Exact mode adds a stage per
compared model (cousins/orchestrate/stages.py, `stage_kld`): an actor holding two engines, the
original's and the cousin's, teacher-forces the same rows (the original's outputs) through both
with every vocabulary logprob at every position (vLLM's `prompt_logprobs=-1`, flat lists rather
than a dict per position), reduces each position on the spot (cousins/drift/vocab_kld.py: over the
ORIGINAL's tokenizer vocabulary, ids past it folded into one tail bucket, on NumPy arrays in
bounded chunks of positions), and writes only per-token numbers (schema.KLD: KL(p ‖ q), KL(q ‖ p)
and the tail mass). No full-vocabulary row is ever stored; the cost is a second engine per actor
and the transfer of a vocabulary of logprobs per position from each engine (docs/benchmarks.md,
"Exact KLD at a 152k vocabulary").

That is the `lists` route. The `hidden` route (chosen before Ray starts where both heads can be
applied by us: cousins/engine/head.py, `head_problem`) runs both models as vLLM pooling engines
that return each position's final hidden state, applies each model's own head to the states at
the output's positions only, and reduces on tensors (the same reduction and error rows): a few KiB
a position from each engine instead of a vocabulary of Python objects.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import pyarrow as pa

from cousins.contract import schema
from cousins.drift.vocab_kld import PositionError, exact_kld
from cousins.engine import templates
from cousins.engine.backend import CORE_ENV, EngineSpec, VllmBackend, hidden_states
from cousins.engine.feeder import EngineBroken, Feeder, Gate
from cousins.engine.rows import SCORE_INPUT, check_rows, teacher_forced_inputs
from cousins.engine.runner import EngineRunner, load_engine, lora_request, node_id
from cousins.run.ledger import KLD, ledger_key

ALL_VOCAB = -1  # vLLM: every vocabulary entry's logprob
# vLLM hands full-vocabulary prompt logprobs over as Python lists: ~20 MiB per position per engine
# at a 152k vocabulary (docs/benchmarks.md), for every position of the prompt as well as of the
# output. A batch goes through the engines in groups of rows of at most this many entries (rows x
# positions x vocabulary) per engine, reduced and dropped before the next group: 221 positions,
# about 4.5 GiB per engine at 152k (a longer row goes alone), the original's kept while the
# cousin's are made; with Ray Data's two batches in flight, ~18 GiB of host memory per actor. The
# engines' time per position (~60 ms each) dwarfs what a bigger group would save. At the tiny
# teacher's 2,048 entries a group is 16k positions: one group a batch.
LOGPROB_ENTRIES_IN_FLIGHT = 1 << 25


# The hidden route: a batch goes through the engines in groups of rows of at most this many hidden
# state entries (positions x hidden size) per engine: 256 MiB of float32 (65k positions at hidden
# 1024, 8k at 8192); the heads then take a chunk of positions at a time (head.CHUNK_CELLS).
HIDDEN_ENTRIES_IN_FLIGHT = 1 << 26
ROUTES = ("hidden", "lists")


def full_spec(spec: EngineSpec) -> EngineSpec:
    """`spec`'s engine allowing full-vocabulary logprobs, on half its GPU memory share (the actor's
    two engines share its GPU)."""
    share = spec.gpu_memory_utilization
    return dataclasses.replace(spec, max_logprobs=ALL_VOCAB, gpu_memory_utilization=share / 2 if share else None)


def hidden_spec(spec: EngineSpec) -> EngineSpec:
    """`spec`'s engine returning final hidden states (vLLM's pooling runner), on a little under half
    its GPU memory share (the two engines share the actor's GPU, and each head's weight sits beside
    them)."""
    share = spec.gpu_memory_utilization
    return dataclasses.replace(spec, runner="pooling", gpu_memory_utilization=share * 0.45 if share else None)


class EncodeFeeder:
    """A pooling engine's calls, one whole call at a time under the gate (vLLM's `encode` runs its
    requests to the end), with what EngineRunner reads of a Feeder when an engine breaks."""

    def __init__(self, llm, gate: Gate | None = None):
        self.llm, self.gate = llm, gate or Gate()
        self.broken: BaseException | None = None
        self.broken_with = 0
        self.recorded, self.records = threading.Condition(), 0

    def turn(self):
        return self.gate.turn()

    def run(self, prompts: list, solo: bool = False) -> tuple[list, float]:
        """(hidden states of each prompt, engine seconds); EngineBroken once the engine raised."""
        with self.gate.turn():
            if self.broken is not None:
                raise EngineBroken(self.broken, during=False)
            t0 = time.perf_counter()
            try:
                out = hidden_states(self.llm, prompts)
            except Exception as e:  # noqa: BLE001 - whatever it was, the engine is done for
                self.broken, self.broken_with = e, 1
                raise EngineBroken(e, during=True, stepping=True) from e
            return out, time.perf_counter() - t0


def _groups(lengths: list[int], positions: int) -> list[list[int]]:
    """Consecutive indices of `lengths` in groups of at most `positions` in all (one row alone may
    exceed it)."""
    out: list[list[int]] = []
    total = positions
    for j, n in enumerate(lengths):
        if total + n > positions:
            out.append([])
            total = 0
        out[-1].append(j)
        total += n
    return out


def _floats(x: np.ndarray) -> list:
    """float32 values as a list, NaN (an infinite reverse KLD) as null."""
    return [None if v != v else v for v in x.astype(np.float32).tolist()]


class KldActor(EngineRunner):
    """Two engines, the original's and a cousin's; called by Ray Data with the original's
    generation rows (SCORE_INPUT), it returns one KLD row per row (schema.KLD)."""

    def __init__(self, original: EngineSpec, cousin: EngineSpec, ledger=None, tolerate_load_failure: bool = False,
                 backend=None, reorder: bool = False, route: str = "lists"):
        """`reorder` (the noise floor): the cousin's engine takes the batch's rows in reverse order,
        so its numbers come from other batch compositions than the original's, as in its scoring.
        `route`: hidden (pooling engines, our heads) or lists (vLLM's full-vocabulary logprobs)."""
        if route not in ROUTES:
            raise ValueError(f"exact-KLD route {route!r}: one of {ROUTES}")
        self.spec, self.ledger, self.reorder, self.route = cousin, ledger, reorder, route
        backend = backend or VllmBackend()
        engine = hidden_spec if route == "hidden" else full_spec
        self.llm, self.load_error = load_engine(engine(cousin), backend, ledger, tolerate_load_failure)
        self.reference, self.ref_error = load_engine(engine(original), backend, None, False)
        if self.llm is not None and route == "hidden":
            self.heads = (backend.head(self.reference, original), None)
            try:
                self.heads = (self.heads[0], backend.head(self.llm, cousin))
            except Exception as e:  # noqa: BLE001 - the cousin's error rows, as a failed load
                if not tolerate_load_failure:
                    raise
                self.llm, self.load_error = None, f"exact KLD cannot apply the head of {cousin.model_name!r}: " \
                                                  f"{type(e).__name__}: {e}"[:2000]
        if self.llm is not None:
            self.tokenizer = self.reference.get_tokenizer()  # the original's positions, for both
            # The vocabulary compared id by id: the original's tokenizer's. Rows of either logit
            # head past it (padding) are no token and go into one tail bucket (drift/vocab_kld.py).
            self.vocab = len(self.tokenizer)
            # Cores in this process (vLLM's in-process engine core) must not step at once: they
            # would share vLLM's global forward context. In processes of their own they may.
            gate = None if os.environ.get(CORE_ENV) == "1" else Gate()
            if route == "hidden":
                self.feeder, self.ref_feeder = EncodeFeeder(self.llm, gate), EncodeFeeder(self.reference, gate)
            else:
                self.params = backend.params(max_tokens=1, temperature=0.0, prompt_logprobs=ALL_VOCAB,
                                             detokenize=False, flat_logprobs=True)
                self.feeder = Feeder(self.llm, gate, lora=lora_request(backend, cousin))
                self.ref_feeder = Feeder(self.reference, gate)
            self.original_format = original.prompt_format
        self.actor = f"{node_id()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.run_batch(ledger_key(self.spec.model_name, KLD), batch, self._rows, self._failed_rows)[0]

    def _failed_rows(self, batch: pa.Table, reason: str) -> pa.Table:
        n = batch.num_rows
        return check_rows(self.spec.model_name, batch, pa.table({
            "prompt_id": batch.column("prompt_id"), "sample_index": batch.column("sample_index"),
            "model": pa.array([self.spec.model_name] * n, pa.string()),
            "kld_tokens": pa.nulls(n, pa.list_(pa.float32())), "rkld_tokens": pa.nulls(n, pa.list_(pa.float32())),
            "tail_mass_tokens": pa.nulls(n, pa.list_(pa.float32())), "engine_time_s": pa.nulls(n, pa.float64()),
            "error": pa.array([reason] * n, pa.string())}, schema=schema.KLD))

    def _hidden(self, rows: list[dict], todo: list[int], inputs: list[list[int]], errors: list, klds: dict,
                solo: bool) -> None:
        """The hidden route of `_rows`: both engines' final hidden states of a group of rows, each
        model's head applied at the output's positions only."""
        from cousins.engine.head import exact_rows

        head_p, head_q = self.heads
        widest = max(int(head_p.weight.shape[1]), int(head_q.weight.shape[1]))
        for group in _groups([len(x) for x in inputs], max(1, HIDDEN_ENTRIES_IN_FLIGHT // widest)):
            prompts = [{"prompt_token_ids": inputs[j]} for j in group]
            hp, _ = self.ref_feeder.run(prompts, solo)
            if self.reorder:
                hq = self.feeder.run(prompts[::-1], solo)[0][::-1]
            else:
                hq, _ = self.feeder.run(prompts, solo)
            at, ps, qs = [], [], []  # the rows to reduce, and their states at the output's positions
            for i, ids, p, q in zip([todo[j] for j in group], [inputs[j] for j in group], hp, hq):
                n = len(rows[i]["output_token_ids"])
                start = len(ids) - n  # the state at position t gives the distribution of token t + 1
                bad = next((f"the {who}'s engine returned {'no' if h is None else int(h.shape[0])} hidden states "
                            f"for {len(ids)} positions" for who, h in (("original", p), ("cousin", q))
                            if h is None or int(h.shape[0]) != len(ids)), None)
                if start < 1:
                    bad = "the output starts the sequence: no position predicts its first token"
                if bad:
                    errors[i] = f"exact KLD at {PositionError(0, bad)}"
                    continue
                at.append(i)
                ps.append(p[start - 1:len(ids) - 1])
                qs.append(q[start - 1:len(ids) - 1])
            for i, e in zip(at, exact_rows(ps, qs, head_p, head_q, self.vocab)):
                if isinstance(e, PositionError):  # this row only: the batch's other rows go on
                    errors[i] = f"exact KLD at {e}"
                else:
                    klds[i] = (e.kld.astype(np.float32).tolist(), _floats(e.rkld),
                               e.tail_mass.astype(np.float32).tolist())
            del hp, hq, ps, qs

    def _rows(self, batch: pa.Table, solo: bool = False) -> tuple[pa.Table, int]:
        rows = batch.select(SCORE_INPUT).to_pylist()
        todo, inputs, errors = teacher_forced_inputs(
            rows, self.load_error,
            lambda texts: [templates.encode(self.tokenizer, x, prompt_format=self.original_format) for x in texts],
            self.spec.max_model_len)
        klds: dict[int, tuple[list, list, list]] = {}
        t0 = time.perf_counter()
        if self.route == "hidden":
            self._hidden(rows, todo, inputs, errors, klds, solo)
        for group in ([] if self.route == "hidden" else
                      _groups([len(x) for x in inputs], max(1, LOGPROB_ENTRIES_IN_FLIGHT // (self.vocab + 1)))):
            prompts = [{"prompt_token_ids": inputs[j]} for j in group]
            p_out, _ = self.ref_feeder.run(prompts, self.params, solo)
            if self.reorder:
                q_out = self.feeder.run(prompts[::-1], self.params, solo)[0][::-1]
            else:
                q_out, _ = self.feeder.run(prompts, self.params, solo)
            for i, ids, p, q in zip([todo[j] for j in group], [inputs[j] for j in group], p_out, q_out):
                n = len(rows[i]["output_token_ids"])
                start = len(ids) - n
                try:
                    if p.prompt_logprobs is None or q.prompt_logprobs is None:
                        raise PositionError(0, "an engine returned no prompt logprobs")
                    e = exact_kld(p.prompt_logprobs, q.prompt_logprobs, start, n, self.vocab)
                except PositionError as err:  # this row only: the batch's other rows go on
                    errors[i] = f"exact KLD at {err}"
                    continue
                klds[i] = (e.kld.astype(np.float32).tolist(), _floats(e.rkld), e.tail_mass.astype(np.float32).tolist())
            del p_out, q_out  # this group's full-vocabulary lists go before the next group's come
        elapsed = time.perf_counter() - t0
        total = sum(len(x) for x in inputs) or 1
        share = {i: elapsed * len(x) / total for i, x in zip(todo, inputs)}
        table = pa.table({
            "prompt_id": [r["prompt_id"] for r in rows], "sample_index": [r["sample_index"] for r in rows],
            "model": [self.spec.model_name] * len(rows),
            **{c: [klds[i][j] if i in klds else None for i in range(len(rows))]
               for j, c in enumerate(("kld_tokens", "rkld_tokens", "tail_mass_tokens"))},
            "engine_time_s": [share.get(i) for i in range(len(rows))],
            "error": errors}, schema=schema.KLD)
        return check_rows(self.spec.model_name, batch, table), sum(len(x) for x in inputs)
