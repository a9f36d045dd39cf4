"""The engine actor in this process (no Ray): two batches at once through one engine (as Ray Data
sends them) give each batch its own rows, equal to one batch at a time; the texts the actor
decodes equal vLLM's own detokenized texts; the ledger's per-actor working windows."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from conftest import at_once, hide_context_proxies
from cousins.engine import actors
from cousins.engine import rows as engine_rows
from cousins.engine import backend as engine
from cousins.run.ledger import Ledger

KEYS = ["prompt_id", "sample_index", "seed", "prompt_tokens", "error"]


def _rows(n: int, offset: int = 0) -> pa.Table:
    ids = range(offset, offset + n)
    t = pa.table({"prompt_id": [f"p{i}" for i in ids], "category": [None] * n,
                  "messages": [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}] for i in ids]})
    return engine_rows.expand_samples(t, samples=1, base_seed=7)


@pytest.fixture(scope="module")
def actor(tiny_teacher):
    os.environ.update(engine.ENGINE_ENV)
    spec = engine.EngineSpec(model_name="tiny-teacher", model_path=tiny_teacher, dtype="float32", quantization=None,
                             max_model_len=256, kv_cache_bytes=128 << 20, tensor_parallel_size=1, max_num_seqs=64,
                             enforce_eager=True, max_logprobs=20)
    sampling = engine.Sampling(temperature=0.8, top_p=0.95, top_k=0, max_tokens=48, logprobs=5)
    with hide_context_proxies():  # the suite's S3 server put Flask proxies in this process
        a = actors.EngineActor(spec, sampling)
    yield a
    del a


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_batches_at_once_get_their_own_rows_equal_to_one_at_a_time(actor):
    a, b = _rows(16), _rows(16, 16)
    one_at_a_time = [actor(a), actor(b)]
    assert actor.feeder.most_calls == 1
    together = at_once(actor, (a, b), timeout=240)
    assert actor.feeder.most_calls == 2  # both batches were in the engine at once
    for i in (0, 1):
        got, want = together[i], one_at_a_time[i]
        # each call got its own rows back, in its order
        assert got.select(KEYS).equals(want.select(KEYS)) and got.column("error").null_count == got.num_rows
        # and their outputs: the same per-row seeds give the same samples; the engine's batch held
        # other rows this time, so floats may differ in the last bits (CPU kernels are not
        # batch-invariant) and, rarely, a near-tie sample with them
        same = [a == b for a, b in zip(got.column("output_token_ids").to_pylist(),
                                        want.column("output_token_ids").to_pylist())]
        assert sum(same) >= 0.9 * len(same), sum(same)
        for col in ("output_logprobs", "topk_logprobs"):
            for ok, a, b in zip(same, got.column(col).to_pylist(), want.column(col).to_pylist()):
                if ok:
                    assert np.allclose(np.array(a, dtype=float), np.array(b, dtype=float), atol=1e-3)
        texts = zip(same, got.column("output_text").to_pylist(), want.column("output_text").to_pylist())
        assert all(a == b for ok, a, b in texts if ok)
        assert all(x > 0 for x in got.column("engine_time_s").to_pylist())
    assert not actor.feeder.pending and not actor.feeder.finished and not actor.feeder.owner


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_actor_decoded_texts_equal_the_engine_detokenized_texts(actor):
    rows = _rows(24, 100)
    assert actor.detokenize is False  # no stop strings: the engine does not detokenize
    ours = actor(rows)
    actor.detokenize = True
    try:
        theirs = actor(rows)
    finally:
        actor.detokenize = False
    assert ours.column("output_token_ids").equals(theirs.column("output_token_ids"))
    assert ours.column("output_text").to_pylist() == theirs.column("output_text").to_pylist()
    assert all(ours.column("output_text").to_pylist())


PROSE = ("Ray Data shards the prompt corpus across actors that each hold one engine; an engine "
         "schedules as many sequences as its token budget allows, and a long document asks for more "
         "of that budget than a short question does. ").split()


def _spread_rows(actor, n: int, seed: int) -> pa.Table:
    """`n` prompts whose token counts spread evenly from the chat template alone to the longest a
    row may have (max_model_len - max_tokens): prose-like word sequences, each prompt its own
    (no shared prefixes for the engine's prefix cache to skip)."""
    import random

    tok, limit = actor.tokenizer, actor.spec.max_model_len - actor.sampling.max_tokens

    def tokens(text: str) -> int:
        return len(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True), add_special_tokens=False))
    texts = []
    for i, target in enumerate(np.linspace(tokens(""), limit, n).astype(int)):
        rng, words = random.Random(seed * 1000 + i), []
        while True:
            longer = words + [rng.choice(PROSE)]
            if tokens(" ".join(longer)) > target:
                break
            words = longer
        texts.append(" ".join(words))
    t = pa.table({"prompt_id": [f"s{seed}-{i}" for i in range(n)], "category": [None] * n,
                  "messages": [[{"role": "user", "content": x}] for x in texts]})
    return engine_rows.expand_samples(t, samples=1, base_seed=seed)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_prompts_of_every_length_generate_at_full_batch_size(actor):
    """Two full batches at once (as Ray Data feeds an actor), prompts from a few tokens to the
    limit: far more prompt tokens than one engine step takes. With chunked prefill a seeded
    prompt split over steps crashed the CPU engine's step ('CPU Generator does not use offset');
    every row generates now, batch after batch."""
    config = actor.llm.llm_engine.vllm_config.scheduler_config
    assert config.enable_chunked_prefill is False and config.max_num_batched_tokens >= actor.spec.max_model_len
    for rep in range(3):
        a, b = _spread_rows(actor, 64, seed=10 * rep), _spread_rows(actor, 64, seed=10 * rep + 1)
        lengths = a.column("messages").to_pylist()
        assert len({len(m[0]["content"]) for m in lengths}) > 50  # lengths really spread
        out = at_once(actor, (a, b), timeout=300)
        for got in out:
            assert got.column("error").null_count == got.num_rows, [e for e in got.column("error").to_pylist() if e]
            prompt_tokens = got.column("prompt_tokens").to_pylist()
            limit = actor.spec.max_model_len - actor.sampling.max_tokens
            assert limit - 8 <= max(prompt_tokens) <= limit
            assert min(prompt_tokens) < 20
            assert all(n > 0 for n in got.column("output_tokens").to_pylist())
    # a seed gives the same sample whatever else is in the batch
    alone = actor(a.slice(60, 4))
    same = [x == y for x, y in zip(alone.column("output_token_ids").to_pylist(),
                                   out[0].slice(60, 4).column("output_token_ids").to_pylist())]
    assert sum(same) >= 3, same  # (CPU kernels are not batch-invariant: a near-tie may differ)


def test_ledger_steady_rate_sums_each_actors_own_rate(monkeypatch):
    import cousins.run.ledger as ledger

    clock = iter([-12.0, 0.0, 5.0, 10.0, 15.0, 20.0, 30.0])  # made at -12; a starts at 0, b at 5
    monkeypatch.setattr(ledger.time, "time", lambda: next(clock))
    led = Ledger()
    led.engine_started("m", -10.0, -1.0, {"vllm_import_s": 2.0, "engine_init_s": 5.0, "warm_up_s": 2.0})  # a's: 9 s
    led.engine_started("m", -9.0, 4.0, {"vllm_import_s": 4.0, "engine_init_s": 7.0, "warm_up_s": 2.0})  # b's: 13 s
    led.batch_started("m", "k1", 8, "a")
    led.batch_started("m", "k2", 8, "b")
    led.batch_done("m", 1 << 20, "a", 100)  # 10
    led.batch_started("m", "k3", 8, "a")  # 15
    led.batch_done("m", 2 << 20, "b", 150)  # 20: b worked 15 s
    led.batch_done("m", 1 << 20, "a", 200)  # 30: a worked 30 s
    r = led.report("m")
    assert r["actors"] == {"a": {"window_s": 30.0, "tokens": 300}, "b": {"window_s": 15.0, "tokens": 150}}
    assert r["steady_tokens_per_s"] == pytest.approx(300 / 30 + 150 / 15)
    assert r["busy_window_s"] == 30.0 and r["batches"] == 3 and r["peak_rss_mib"] == 2.0
    # the stage's timeline from the ledger's creation: loads, first batch, last batch done
    assert r["engine_starts"] == 2 and r["engine_load_s"] == [9.0, 13.0]
    assert r["engine_load_began_at_s"] == [2.0, 3.0] and r["engine_ready_at_s"] == [11.0, 16.0]
    assert r["first_batch_at_s"] == 12.0 and r["last_batch_done_at_s"] == 42.0
    # start-up by part, the engines' mean: from the pool's start to each load (2 and 3 s), then the load's parts
    assert r["startup_s"] == {"actor_start_s": 2.5, "vllm_import_s": 3.0, "engine_init_s": 6.0, "warm_up_s": 2.0}
    assert led.report("other") == {**led.report("other"), "engine_load_s": [], "engine_starts": 0}


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_an_engine_core_in_its_own_process_gives_the_rows_of_one_in_the_actor(actor, tiny_teacher):
    """engine.core_process=separate (the GPU default) through the actor's feeder (LLM.enqueue and
    llm_engine.step against vLLM's engine-core client) gives the same rows as the CPU default: this
    module's actor (its core in the actor's process) on the probe's rows and sampling. (Before the
    next test: a second engine in this process, once deleted, takes vLLM's process-wide parallel
    state with it and leaves this module's actor unable to step.)"""
    import dataclasses
    import json
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    env.pop(engine.CORE_ENV, None)
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "engine_core_probe.py"), tiny_teacher, "separate"],
                         capture_output=True, text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    separate = json.loads(next(x for x in out.stdout.splitlines() if x.startswith('{"core_client"')))
    # the probe's spec is this actor's; its sampling differs in max_tokens only
    sampling = actor.sampling
    actor.sampling = dataclasses.replace(sampling, max_tokens=24)
    try:
        rows = actor(_rows(16))
    finally:
        actor.sampling = sampling
    in_actor = {"core_client": type(actor.llm.llm_engine.engine_core).__name__,
                "texts": rows.column("output_text").to_pylist(), "logprobs": rows.column("output_logprobs").to_pylist()}
    assert in_actor["core_client"] == "InprocClient" and separate["core_client"] == "SyncMPClient"
    assert separate["errors"] == [None] * 16
    assert separate["texts"] == in_actor["texts"]
    np.testing.assert_allclose(np.concatenate(separate["logprobs"]), np.concatenate(in_actor["logprobs"]), atol=1e-4)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_originals_scores_from_its_generation_pass_are_its_scoring_pass(actor):
    """A drift run takes the original's scores from its generation pass (one engine start, not
    two). That is the same thing as scoring its outputs teacher-forced: the same top-20 tokens and
    logprobs at every position (raw logprobs both ways; float noise apart), and the same
    generation rows as a plain pass."""
    spec, sampling = actor.spec, actor.sampling
    with hide_context_proxies():
        both = actors.SelfScoringActor(spec, sampling, topk=20)
    rows = _rows(24, 300)
    out = both(rows)
    gen = out.filter(pa.compute.equal(out.column(engine_rows.TASK), "gen"))
    derived = out.filter(pa.compute.equal(out.column(engine_rows.TASK), "score"))
    plain = actor(rows)
    assert gen.column("output_token_ids").equals(plain.column("output_token_ids"))  # same seeds, same samples
    assert all(len(p) == 5 for r in gen.column("topk_token_ids").to_pylist() for p in r)  # stored at logprobs=5
    scorer = actors.ScoreActor(spec, 20, engine=both)  # a teacher-forced pass on the same engine
    scored = scorer(gen.select(engine_rows.SCORE_INPUT))
    assert scored.column("error").null_count == derived.column("error").null_count == rows.num_rows
    positions = same_ids = 0
    for d, s in zip(derived.to_pylist(), scored.to_pylist()):
        assert len(d["topk_token_ids"]) == len(s["topk_token_ids"]) == len(d["token_logprobs"])
        assert np.allclose(d["token_logprobs"], s["token_logprobs"], atol=1e-4)
        for di, si, dl, sl in zip(d["topk_token_ids"], s["topk_token_ids"], d["topk_logprobs"], s["topk_logprobs"]):
            positions += 1
            same_ids += di == si
            assert np.allclose(sorted(dl), sorted(sl), atol=1e-4)  # (near-ties may swap two ids)
    assert positions > 200 and same_ids >= 0.98 * positions, (same_ids, positions)


@pytest.mark.integration
def test_topk_columns_read_flat_logprobs_as_the_dicts_say():
    """The engine actors ask vLLM for flat logprobs (no dict per position) and read them by
    slicing; on vLLM's own containers filled by vLLM's own append, that gives what ranking the
    dicts gives: the top-k by rank and the position's token's logprob, whether that token is in
    the top-k or not, for prompt logprobs (a None first position) and sampled ones."""
    import numpy as np
    from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs, create_sample_logprobs

    from cousins.engine.rows import topk_columns

    rng = np.random.default_rng(3)
    for make, start in ((create_sample_logprobs, 0), (create_prompt_logprobs, 1)):
        flat, dicts, tokens, ranks = make(True), make(False), [], []
        for _ in range(200):
            lp = rng.normal(0, 2, 40)
            lp = (lp - np.log(np.exp(lp).sum())).tolist()
            order = sorted(range(40), key=lambda t: -lp[t])
            t = int(order[0] if rng.random() < 0.5 else rng.integers(40))  # often the best, sometimes far down
            tokens.append(t), ranks.append(order.index(t) + 1)
            for c in (flat, dicts):
                append_logprobs_for_next_position(c, [t] + order[:8], [lp[t]] + [lp[x] for x in order[:8]],
                                                  [None] * 9, order.index(t) + 1, 8)
        assert any(r == 1 for r in ranks) and any(r > 8 for r in ranks)  # in the top-k, and outside it
        for k in (1, 5, 8):
            got, want = topk_columns(flat, k, tokens, start), topk_columns(dicts, k, tokens, start)
            assert got == want and all(len(ids) == k for ids in got[0])
        # Another layout (each position's entries reversed) is ranked, not sliced: the same columns.
        rev = SimpleNamespace(start_indices=flat.start_indices, end_indices=flat.end_indices, token_ids=[],
                              logprobs=[], ranks=[])
        for a, b in zip(flat.start_indices, flat.end_indices):
            for name in ("token_ids", "logprobs", "ranks"):
                getattr(rev, name).extend(getattr(flat, name)[a:b][::-1])
        assert topk_columns(rev, 5, tokens, start) == topk_columns(dicts, 5, tokens, start)
