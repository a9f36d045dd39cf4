"""Exact KLD (drift.kld=exact): the per-position reduction against the full-vocabulary formula,
the diff taking it in place of the top-k bound, and on real vLLM (the tiny teacher against its
rtn-int4 cousin, two engines in one actor) against transformers in float64."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import at_once, cuda_gpus, hide_context_proxies
from cousins import schema
from cousins.drift import compare as cmp
from cousins.drift import metrics
from cousins.kld import position_kld


def test_a_position_kld_equals_the_full_vocabulary_formula_whatever_the_order_of_the_lists():
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = int(rng.integers(5, 300))
        p, q = rng.normal(0, 3, (1, v)), rng.normal(0, 3, (1, v))
        lp, lq = p - np.log(np.exp(p).sum()), q - np.log(np.exp(q).sum())
        order_p, order_q = rng.permutation(v), rng.permutation(v)
        got = position_kld(order_p, lp[0][order_p], order_q, lq[0][order_q])
        assert got == pytest.approx(metrics.full_kld(p, q)[0], rel=1e-12, abs=1e-15)
    assert position_kld([0, 1], [0.0, -np.inf], [1, 0], [-1.0, -0.5]) == pytest.approx(0.5)


def _gens(keys, outputs):
    n = len(keys)
    return pa.table({"prompt_id": [k[0] for k in keys], "sample_index": [k[1] for k in keys], "category": [None] * n,
                     "output_text": ["a b"] * n, "output_token_ids": outputs, "finish_reason": ["stop"] * n,
                     "output_tokens": [len(o) for o in outputs], "error": [None] * n})


def _scores(keys, outputs, k=2):
    rows = {"prompt_id": [x[0] for x in keys], "sample_index": [x[1] for x in keys],
            "topk_token_ids": [[[t, t + 1][:k] for t in o] for o in outputs],
            "topk_logprobs": [[[-0.1, -2.5][:k] for _ in o] for o in outputs],
            "token_logprobs": [[-0.1] * len(o) for o in outputs], "error": [None] * len(keys)}
    return pa.table(rows)


def test_the_diff_takes_the_exact_kld_in_place_of_the_bound_and_keeps_the_rest_mass():
    keys, outs = [("p0", 0), ("p1", 0), ("p2", 0)], [[3, 4], [5], [6, 7]]
    exact = pa.table({"prompt_id": ["p2", "p0", "p1"], "sample_index": [0, 0, 0], "model": ["c"] * 3,
                      "kld_tokens": [[0.5, 0.25], [0.125, 0.0], None], "engine_time_s": [0.1] * 3,
                      "error": [None, None, "engine failed on this batch"]}, schema=schema.KLD)
    topk = cmp.compare("c", _gens(keys, outs), _gens(keys, outs), _scores(keys, outs), _scores(keys, outs))
    rows = cmp.compare("c", _gens(keys, outs), _gens(keys, outs), _scores(keys, outs), _scores(keys, outs),
                       exact_kld=exact).to_pylist()
    assert rows[0]["kld_tokens"] == [0.125, 0.0] and rows[0]["kld_mean"] == 0.0625 and rows[0]["kld_max"] == 0.125
    assert rows[2]["kld_tokens"] == [0.5, 0.25]
    assert rows[1]["error"] == "exact KLD: engine failed on this batch"
    assert rows[0]["rest_mass_tokens"] == topk.to_pylist()[0]["rest_mass_tokens"]
    missing = cmp.compare("c", _gens(keys, outs), _gens(keys, outs), _scores(keys, outs), _scores(keys, outs),
                          exact_kld=exact.slice(0, 1)).to_pylist()
    assert [r["error"] for r in missing] == ["exact KLD: missing", "exact KLD: missing", None]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_exact_kld_on_vllm_equals_transformers_in_float64(tiny_teacher, tmp_path):
    """Two real vLLM engines in one actor (the teacher, its rtn-int4 cousin) against a
    full-vocabulary float64 computation with transformers on the same token ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from cousins import actors, engine
    from cousins.kld import KldActor
    from cousins.quantize import build_quantized

    int4 = str(build_quantized(tiny_teacher, tmp_path / "int4", "rtn-int4"))

    def spec(name, path):  # (on a GPU, three engines share it: vLLM must find its share free at start)
        return engine.EngineSpec(model_name=name, model_path=path, dtype="float32", quantization=None,
                                 max_model_len=256, kv_cache_bytes=64 << 20, tensor_parallel_size=1, max_num_seqs=64,
                                 enforce_eager=True, max_logprobs=20,
                                 gpu_memory_utilization=0.6 if cuda_gpus() else None)

    prompts = pa.table({"prompt_id": [f"p{i}" for i in range(12)], "category": [None] * 12,
                        "messages": [[{"role": "user", "content": f"What is {i} times {i + 3}? Say it."}]
                                     for i in range(12)]})
    with hide_context_proxies():
        gen = actors.EngineActor(spec("tiny-teacher", tiny_teacher),
                                 engine.Sampling(temperature=0.8, top_p=1.0, top_k=0, max_tokens=32, logprobs=0))
        rows = gen(actors.expand_samples(prompts, samples=1, base_seed=3)).select(actors.SCORE_INPUT)
        del gen
        got = KldActor(spec("tiny-teacher", tiny_teacher), spec("int4", int4))(rows)
    assert got.column("error").null_count == got.num_rows

    def logprobs(path, ids):
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64).eval()
        with torch.no_grad():
            return torch.log_softmax(m(torch.tensor([ids])).logits[0].double(), dim=-1).numpy()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    mine, ref = [], []
    for row, kld in zip(rows.to_pylist(), got.column("kld_tokens").to_pylist()):
        y = row["output_token_ids"]
        ids = tok.encode(row["prompt_text"], add_special_tokens=False) + y
        lp, lq = logprobs(tiny_teacher, ids), logprobs(int4, ids)
        at = slice(len(ids) - len(y) - 1, len(ids) - 1)  # the positions that predict the output tokens
        full = (np.exp(lp[at]) * (lp[at] - lq[at])).sum(axis=1)
        assert len(kld) == len(y)
        np.testing.assert_allclose(kld, full, rtol=0.01, atol=1e-5)
        mine += kld
        ref += full.tolist()
    assert np.mean(mine) == pytest.approx(np.mean(ref), rel=0.01)
    print(f"\nexact KLD over {len(ref)} tokens: mean {np.mean(mine):.6g} (transformers float64 {np.mean(ref):.6g})")


def _overlap_probe(actor):
    """Wrap the step of both engines of a KldActor: the most steps ever inside at once."""
    import threading
    import time

    state = {"inside": 0, "most": 0}
    lock = threading.Lock()

    def wrap(step):
        def probed():
            with lock:
                state["inside"] += 1
                state["most"] = max(state["most"], state["inside"])
            try:
                time.sleep(0.004)  # a forward pass's time, in which another thread may enter
                return step()
            finally:
                with lock:
                    state["inside"] -= 1
        return probed

    for llm in (actor.llm, actor.reference):
        llm.llm_engine.step = wrap(llm.llm_engine.step)
    return state


def test_the_two_engines_of_an_exact_kld_actor_never_step_at_once(monkeypatch):
    """vLLM keeps its forward context in a module global: two in-process engines stepping at once
    in two threads read each other's attention metadata (a run's exact KLD had a fifth of one
    stage's rows at up to 14.5 nats that a recompute put at 0.0003). The actor's two engines share
    one gate, so with Ray Data's concurrent batches their steps still take turns, and the numbers
    are those of the batches one at a time."""
    from cousins import actors
    from cousins.engine import CORE_ENV, EngineSpec, Sampling
    from cousins.feeder import Feeder
    from cousins.kld import KldActor
    from fake_engine import FakeBackend
    from test_actors import rows

    monkeypatch.setenv(CORE_ENV, "0")  # the engine cores run in the actor's process
    spec = EngineSpec(model_name="orig", model_path="/models/orig", dtype="float32", quantization=None,
                      max_model_len=96, kv_cache_bytes=0, tensor_parallel_size=1, max_num_seqs=4,
                      enforce_eager=True, max_logprobs=20)
    cousin = EngineSpec(**{**spec.__dict__, "model_name": "cousin", "model_path": "/models/cousin"})
    gen = actors.EngineActor(spec, Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=6, logprobs=0),
                             backend=FakeBackend())
    batches = [gen(rows(8, 8 * i)) for i in range(6)]
    one_at_a_time = [KldActor(spec, cousin, backend=FakeBackend())(b) for b in batches]

    kld = KldActor(spec, cousin, backend=FakeBackend())
    probe = _overlap_probe(kld)
    # started 5 ms apart: one call scores on the original's engine while another is on the cousin's
    together = at_once(kld, batches, 120, stagger_s=0.005)
    assert probe["most"] == 1
    for a, b in zip(together, one_at_a_time):
        assert a.column("kld_tokens").to_pylist() == b.column("kld_tokens").to_pylist()
        assert a.column("error").null_count == a.num_rows
    assert sum(len(x) for t in together for x in t.column("kld_tokens").to_pylist()) > 0

    # The probe sees overlap where it happens: the same actor with a gate per engine.
    apart = KldActor(spec, cousin, backend=FakeBackend())
    apart.feeder, apart.ref_feeder = Feeder(apart.llm), Feeder(apart.reference)
    probe = _overlap_probe(apart)
    at_once(apart, batches, 120, stagger_s=0.005)
    assert probe["most"] == 2
