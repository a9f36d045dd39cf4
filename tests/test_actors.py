"""The engine actors and the feeder on a deterministic fake engine (tests/fake_engine.py), in this
process: no Ray, no vLLM. What only real vLLM shows is in test_engine_vllm.py."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from conftest import at_once
from cousins.engine import actors
from cousins.engine.feeder import Feeder
from cousins.engine import rows as engine_rows
from cousins.contract import schema
from cousins.engine.backend import EngineSpec, Sampling
from fake_engine import FakeBackend

SPEC = EngineSpec(model_name="fake", model_path="/models/fake", dtype="float32", quantization=None, max_model_len=96,
                  kv_cache_bytes=0, tensor_parallel_size=1, max_num_seqs=4, enforce_eager=True, max_logprobs=20)


def rows(n: int, offset: int = 0, samples: int = 1, text: str = "what is {i} plus {i}?") -> pa.Table:
    ids = range(offset, offset + n)
    t = pa.table({"prompt_id": [f"p{i}" for i in ids], "category": [None] * n,
                  "messages": [[{"role": "user", "content": text.format(i=i)}] for i in ids]})
    return engine_rows.expand_samples(t, samples=samples, base_seed=7)


def test_one_row_per_row_in_and_a_refused_prompt_fails_alone():
    a = actors.EngineActor(SPEC, Sampling(temperature=0.8, top_p=1.0, top_k=0, max_tokens=12, logprobs=3),
                           backend=FakeBackend())
    batch = pa.concat_tables([rows(3), rows(1, 3, text="FAIL {i}"), rows(2, 4, text="x" * 200)])
    out = a(batch)
    assert schema.row_keys(out) == schema.row_keys(batch) and out.schema == schema.GENERATIONS
    errors = out.column("error").to_pylist()
    assert errors[:3] == [None] * 3
    assert errors[3] == "ValueError: the fake engine refuses this prompt"
    assert all(e.startswith("ValueError: prompt has") and "max_model_len is 96" in e for e in errors[4:])
    ok = out.slice(0, 3).to_pylist()
    for r in ok:
        assert r["output_tokens"] == len(r["output_token_ids"]) == len(r["topk_token_ids"]) > 0
        assert all(len(k) == 3 for k in r["topk_logprobs"]) and r["finish_reason"] in ("stop", "length")
        assert r["output_text"] == a.tokenizer.decode(r["output_token_ids"])
    assert sum(r["engine_time_s"] for r in ok) > 0


def test_two_batches_at_once_through_one_engine_equal_one_at_a_time_and_seeds_hold_across_batches():
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, logprobs=2)
    a = actors.EngineActor(SPEC, sampling, backend=FakeBackend())
    x, y = rows(8, samples=2), rows(8, 8, samples=2)
    one_at_a_time = [a(x), a(y)]
    assert a.feeder.most_calls == 1
    together = at_once(a, (x, y), timeout=60)
    assert a.feeder.most_calls == 2 and not a.feeder.pending and not a.feeder.finished  # nothing left behind
    cols = ["prompt_id", "sample_index", "seed", "output_token_ids", "topk_logprobs"]
    for i in (0, 1):
        assert together[i].select(cols).equals(one_at_a_time[i].select(cols))
    # a row's seed gives its sample whatever else is in the batch
    alone = a(x.slice(5, 1))
    assert alone.column("output_token_ids")[0] == one_at_a_time[0].column("output_token_ids")[5]


def test_scoring_the_same_model_returns_its_own_logprobs_row_for_row():
    g = actors.EngineActor(SPEC, Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=10, logprobs=5),
                           backend=FakeBackend())
    gens = g(pa.concat_tables([rows(4), rows(1, 4, text="FAIL")]))
    s = actors.ScoreActor(SPEC, topk=5, backend=FakeBackend())
    scores = s(gens)
    assert schema.row_keys(scores) == schema.row_keys(gens) and scores.schema == schema.SCORES
    for gen, sc in zip(gens.to_pylist()[:4], scores.to_pylist()[:4]):
        assert sc["topk_token_ids"] == gen["topk_token_ids"]  # teacher-forced = what it generated
        assert sc["token_logprobs"] == pytest.approx(gen["output_logprobs"])
    assert scores.column("error")[4].as_py() == "the original has no output here to score"


def test_a_cousin_that_cannot_load_fails_its_rows_with_the_reason_and_the_original_fails_the_job():
    sampling = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=4, logprobs=0)
    broken = FakeBackend(fail_loading=("fake",))
    a = actors.EngineActor(SPEC, sampling, tolerate_load_failure=True, backend=broken)
    out = a(rows(3))
    assert out.num_rows == 3 and set(out.column("error").to_pylist()) == {
        "engine failed to load 'fake' from /models/fake: OSError: no weights at /models/fake"}
    with pytest.raises(OSError):
        actors.EngineActor(SPEC, sampling, backend=broken)


def test_an_actor_breaking_one_row_out_per_row_in_is_an_error_naming_the_model_and_batch():
    batch = rows(3)
    with pytest.raises(engine_rows.EngineContractError, match=r"model 'fake', batch [0-9a-f]{24}: 2 rows out for 3 in"):
        engine_rows.check_rows("fake", batch, batch.slice(0, 2))
    with pytest.raises(engine_rows.EngineContractError, match="another order"):
        engine_rows.check_rows("fake", batch, batch.take([1, 0, 2]))


def _restart(actor) -> None:
    """What Ray does when an engine actor exits: a fresh engine (here: in the same object, which
    keeps its count of the batches that broke one, as the pool's ledger does across restarts)."""
    actor.llm = FakeBackend().load(SPEC)
    actor.feeder, actor.retire = Feeder(actor.llm), False


def test_an_engine_that_breaks_is_replaced_and_a_batch_that_breaks_it_twice_becomes_error_rows():
    a = actors.EngineActor(SPEC, Sampling(temperature=0.8, top_p=1.0, top_k=0, max_tokens=6, logprobs=2),
                           backend=FakeBackend())
    bad = pa.concat_tables([rows(2, 0), rows(1, 2, text="CRASH {i}"), rows(2, 3)])
    good = rows(5, 10)
    # both batches in the engine when it breaks: each actor call ends the engine (outside Ray: raises)
    with pytest.raises(RuntimeError, match="engine broken: RuntimeError: the fake engine crashed"):
        a(bad)
    _restart(a)
    # on the fresh engine the batch runs alone, breaks it again: its rows are error rows with the reason
    out = a(bad)
    assert schema.row_keys(out) == schema.row_keys(bad) and out.column("error").null_count == 0
    assert set(out.column("error").to_pylist()) == {
        "the engine failed on this batch twice, the second time running it alone on a fresh engine: "
        "RuntimeError: the fake engine crashed in a step"}
    # the broken engine takes no further batch; a fresh one generates the next as usual
    with pytest.raises(RuntimeError, match="engine broken: its engine broke on an earlier batch"):
        a(good)
    _restart(a)
    assert a(good).column("error").null_count == good.num_rows


def test_a_batch_in_the_engine_beside_the_one_that_broke_it_is_retried_alone_and_lands():
    a = actors.EngineActor(SPEC, Sampling(temperature=0.8, top_p=1.0, top_k=0, max_tokens=20, logprobs=2),
                           backend=FakeBackend())
    bad, good = rows(1, 0, text="CRASH {i}"), rows(6, 10)
    outcomes = {}

    def call(name, batch):
        try:
            outcomes[name] = a(batch)
        except RuntimeError as e:
            outcomes[name] = e

    import threading

    first = threading.Thread(target=call, args=("good", good))
    first.start()
    while not a.feeder.pending:  # the good batch is in the engine when the bad one comes
        pass
    call("bad", bad)
    first.join(30)
    assert all(isinstance(outcomes[k], RuntimeError) for k in ("good", "bad"))  # one broken engine, both out
    _restart(a)
    assert a(good).column("error").null_count == good.num_rows  # alone on a fresh engine: it lands
    assert a._own_breaks and max(a._own_breaks.values()) == 1


def test_multiple_choice_rows_get_each_options_log_likelihood_whatever_the_batch():
    """Sample 0 of a prompt with choices: each option's log-likelihood as the prompt's continuation
    (here the fake engine's bigram model, so exactly log p(letter | the prompt's last token)); other
    samples and prompts without choices get none; the figures do not depend on the batch."""
    from fake_engine import Tokenizer, _Model

    spec = dataclasses.replace(SPEC, choice_target="letter")
    a = actors.EngineActor(spec, Sampling(temperature=0.8, top_p=1.0, top_k=0, max_tokens=6, logprobs=0),
                           backend=FakeBackend())
    t = pa.table({"prompt_id": ["mc", "open"], "category": [None, None],
                  "messages": [[{"role": "user", "content": "Capital?\nA. Paris\nB. Lyon\nC. Nice\nAnswer:"}],
                               [{"role": "user", "content": "Say hi"}]],
                  "choices": [["Paris", "Lyon", "Nice"], None]})
    batch = engine_rows.expand_samples(t, samples=2, base_seed=3)
    out = a(batch).to_pylist()
    mc = out[0]
    prompt_ids = Tokenizer().encode(mc["prompt_text"])
    model = _Model(spec.model_path)
    want = [model.logprobs(prompt_ids[-1])[Tokenizer().encode(x)[0]] for x in "ABC"]
    assert mc["choice_logprobs"] == pytest.approx(want) and mc["choice_chars"] == [1, 1, 1]
    assert all(r["choice_logprobs"] is None and r["choice_chars"] is None for r in out[1:])
    alone = a(batch.slice(0, 1)).to_pylist()[0]
    assert alone["choice_logprobs"] == mc["choice_logprobs"]
    # the options' texts as continuations (ARC-style), characters counted for acc_norm
    text = actors.EngineActor(dataclasses.replace(SPEC, choice_target="text"), a.sampling, backend=FakeBackend())
    assert text(batch.slice(0, 1)).to_pylist()[0]["choice_chars"] == [5, 4, 4]
    off = actors.EngineActor(SPEC, a.sampling, backend=FakeBackend())  # choice_target off: none
    assert off(batch.slice(0, 1)).to_pylist()[0]["choice_logprobs"] is None
