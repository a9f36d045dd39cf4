"""Exact KLD (drift.kld=exact): the reduction (cousins/drift/vocab_kld.py) against a float64
reference over the tokenizer's vocabulary plus a tail bucket, with logit heads of different
widths and tails that carry real mass; bad positions as row errors; the diff taking it in place
of the top-k bound; and on real vLLM (two engines in one actor) against transformers in float64:
the tiny teacher against its rtn-int4 cousin, and two copies of it with padded heads."""

from __future__ import annotations

import gc
import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from conftest import at_once, cuda_gpus, hide_context_proxies
from cousins.contract import schema
from cousins.drift import compare as cmp
from cousins.drift.vocab_kld import PositionError, exact_kld


def _lsm(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def flat(logprobs: np.ndarray, tokens: list[int], float32: bool = True) -> SimpleNamespace:
    """vLLM's FlatLogprobs layout of (positions, head width) logprobs: position 0 empty (the
    prompt's first token has none), then per position its token first and every id in rank order."""
    f = SimpleNamespace(start_indices=[0], end_indices=[0], token_ids=[], logprobs=[])
    for row, tok in zip(logprobs, tokens):
        row = row.astype(np.float32).astype(np.float64) if float32 else row
        order = np.argsort(-row, kind="stable")
        f.start_indices.append(len(f.logprobs))
        f.token_ids += [int(tok), *order.tolist()]
        f.logprobs += [float(row[tok]), *row[order].tolist()]
        f.end_indices.append(len(f.logprobs))
    return f


def dicts(f: SimpleNamespace) -> list:
    """The same positions as vLLM's list of dicts (the fallback layout)."""
    return [None] + [{t: SimpleNamespace(logprob=lp) for t, lp in zip(f.token_ids[a:b], f.logprobs[a:b])}
                     for a, b in zip(f.start_indices[1:], f.end_indices[1:])]


def reference(lp: np.ndarray, lq: np.ndarray, vocab: int):
    """KL both ways and the tail masses, position by position in float64, over ids < vocab plus
    one bucket of each head's ids ≥ vocab; each distribution renormalised over its head (as the
    reduction does: float32 logprobs sum to 1 only within their round-off)."""
    out = []
    for a, b in zip(lp, lq):
        p = np.append(np.exp(a[:vocab]), np.exp(a[vocab:]).sum())
        q = np.append(np.exp(b[:vocab]), np.exp(b[vocab:]).sum())
        p, q = p / p.sum(), q / q.sum()
        fwd = sum(x * (math.log(x) - math.log(y)) for x, y in zip(p, q) if x > 0)
        rev = sum(y * (math.log(y) - math.log(x)) for x, y in zip(p, q) if y > 0)
        out.append((fwd, rev, max(p[-1], q[-1])))
    return np.asarray(out)


def heads(rng, n: int, vocab: int, wp: int, wq: int, tail_p: float = -4.0, tail_q: float = -6.0):
    """Logprobs of two related models over heads of widths wp and wq (≥ vocab), their padded rows
    at logits shifted by tail_p / tail_q (about 2% and 0.3% of the mass at vocab 40, 7 rows)."""
    base = rng.normal(0, 2, (n, max(wp, wq)))
    p = base[:, :wp].copy()
    q = base[:, :wq] + rng.normal(0, 0.4, (n, wq))
    p[:, vocab:] += tail_p
    q[:, vocab:] += tail_q
    return _lsm(p), _lsm(q)


@pytest.mark.parametrize("chunk_cells", [1, 100, 1 << 20])  # one position a chunk, a few, all
def test_the_reduction_equals_a_float64_reference_with_heads_of_different_widths(chunk_cells):
    rng = np.random.default_rng(1)
    vocab, n = 40, 23
    lp, lq = heads(rng, n, vocab, wp=vocab + 7, wq=vocab + 3)
    lp, lq = lp.astype(np.float32).astype(np.float64), lq.astype(np.float32).astype(np.float64)
    y = rng.integers(0, vocab, n).tolist()
    want = reference(lp, lq, vocab)
    p, q = flat(lp, y), flat(lq, y)
    for fp, fq in ((p, q), (dicts(p), dicts(q)), (p, dicts(q))):  # both layouts, and one of each
        got = exact_kld(fp, fq, 1, n, vocab, chunk_cells=chunk_cells)
        np.testing.assert_allclose(got.kld, want[:, 0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.rkld, want[:, 1], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.tail_mass, want[:, 2], rtol=1e-9)
    # a window of the output (the prompt's positions skipped), and identical models give exactly 0
    mid = exact_kld(p, q, 5, 9, vocab, chunk_cells=chunk_cells)
    np.testing.assert_allclose(mid.kld, want[4:13, 0], rtol=1e-9, atol=1e-12)
    same = exact_kld(p, p, 1, n, vocab, chunk_cells=chunk_cells)
    assert (same.kld == 0).all() and (same.rkld == 0).all()


def test_a_tail_with_real_mass_is_one_bucket_not_dropped_and_not_infinite():
    """Padded rows holding ~5% of the original's mass and ~0.5% of the cousin's, and the cousin's
    head narrower than the original's: the ids only the original's head has are in the tail
    bucket, so KL is finite; dropping the tail (or comparing id by id past the vocabulary) gives
    other numbers."""
    rng = np.random.default_rng(2)
    vocab, n = 40, 12
    lp, lq = heads(rng, n, vocab, wp=vocab + 8, wq=vocab + 2, tail_p=-1.5, tail_q=-3.5)
    y = rng.integers(0, vocab, n).tolist()
    got = exact_kld(flat(lp, y, float32=False), flat(lq, y, float32=False), 1, n, vocab)
    want = reference(lp, lq, vocab)
    tail_p = np.exp(lp[:, vocab:]).sum(axis=1)
    assert tail_p.mean() > 0.03 and np.isfinite(got.kld).all() and np.isfinite(got.rkld).all()
    np.testing.assert_allclose(got.kld, want[:, 0], rtol=1e-12)
    np.testing.assert_allclose(got.tail_mass, np.maximum(tail_p, np.exp(lq[:, vocab:]).sum(axis=1)), rtol=1e-12)
    # the tail term is a sizeable part of the KLD: without it (head only, renormalised) the figure moves
    hp, hq = _lsm(lp[:, :vocab]), _lsm(lq[:, :vocab])
    dropped = (np.exp(hp) * (hp - hq)).sum(axis=1)
    assert np.abs(dropped - got.kld).mean() > 0.01 * got.kld.mean()
    # a cousin whose head is exactly the vocabulary (no tail, as Llama-3's) against a padded original:
    # no tail to compare, so both are compared over real tokens, the original renormalised over V
    # (finite both ways, the original's tail mass reported), and the same the other way round
    narrow = _lsm(lq[:, :vocab])
    one_sided = exact_kld(flat(lp, y, float32=False), flat(narrow, y, float32=False), 1, n, vocab)
    np.testing.assert_allclose(one_sided.kld, (np.exp(hp) * (hp - narrow)).sum(axis=1), rtol=1e-9)
    np.testing.assert_allclose(one_sided.rkld, (np.exp(narrow) * (narrow - hp)).sum(axis=1), rtol=1e-9)
    np.testing.assert_allclose(one_sided.tail_mass, tail_p, rtol=1e-12)
    other = exact_kld(flat(narrow, y, float32=False), flat(lp, y, float32=False), 1, n, vocab)
    np.testing.assert_allclose(other.kld, one_sided.rkld, rtol=1e-9)


@pytest.mark.parametrize("bad, problem", [
    (lambda lp: np.where(np.arange(lp.shape[1]) == 3, np.nan, lp), r"logprob of id 3 is nan"),
    (lambda lp: np.where(np.arange(lp.shape[1]) == 5, np.inf, lp), r"logprob of id 5 is inf"),
    (lambda lp: lp - 0.1, r"probabilities sum to 0\.9048"),  # not normalised
    (lambda lp: _lsm(np.where(np.arange(lp.shape[1]) == 7, -np.inf, lp)), r"gives probability 0 to id 7"),
])
def test_a_position_that_cannot_give_a_finite_kld_is_an_error_naming_it_never_zero(bad, problem):
    rng = np.random.default_rng(3)
    vocab, n = 40, 6
    lp, lq = heads(rng, n, vocab, vocab + 4, vocab + 4)
    y = rng.integers(0, vocab, n).tolist()
    lq_bad = lq.copy()
    lq_bad[4] = bad(lq[4:5])[0]  # the cousin's position 4 only
    with pytest.raises(PositionError, match=rf"output position 4: the cousin.*{problem}"):
        exact_kld(flat(lp, y), flat(lq_bad, y), 1, n, vocab)
    with pytest.raises(PositionError, match=r"output position 4"):  # in the dict layout too
        exact_kld(dicts(flat(lp, y)), dicts(flat(lq_bad, y)), 1, n, vocab, chunk_cells=100)
    assert np.isfinite(exact_kld(flat(lp, y), flat(lq_bad, y), 1, 4, vocab).kld).all()  # before it: fine


def _fake_pair_and_batch(monkeypatch):
    """An exact-KLD actor's two specs on fake engines (cores in their own process: no shared gate)
    and a batch of the original's greedy rows to score."""
    from cousins.engine import actors
    from cousins.engine.backend import CORE_ENV, EngineSpec, Sampling
    from fake_engine import FakeBackend
    from test_actors import rows

    monkeypatch.setenv(CORE_ENV, "1")
    spec = EngineSpec(model_name="orig", model_path="/models/orig", dtype="float32", quantization=None,
                      max_model_len=96, kv_cache_bytes=0, tensor_parallel_size=1, max_num_seqs=4,
                      enforce_eager=True, max_logprobs=20)
    cousin = EngineSpec(**{**spec.__dict__, "model_name": "cousin", "model_path": "/models/cousin"})
    batch = actors.EngineActor(spec, Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=6, logprobs=0),
                               backend=FakeBackend())(rows(6))
    return spec, cousin, batch


def test_a_bad_position_fails_its_row_only_and_the_batch_goes_on(monkeypatch):
    """Through the actor (fake engines): the rows whose cousin logprobs hold a NaN are error rows
    naming the position; the others equal a clean run's."""
    from cousins.engine.kld_actor import KldActor
    from fake_engine import FakeBackend

    spec, cousin, batch = _fake_pair_and_batch(monkeypatch)
    clean = KldActor(spec, cousin, backend=FakeBackend())(batch)
    kld = KldActor(spec, cousin, backend=FakeBackend())
    poisoned = batch.column("output_token_ids")[2].as_py()
    row2 = kld.tokenizer.encode(batch.column("prompt_text")[2].as_py()) + poisoned
    step = kld.llm.llm_engine.step

    def poisoning_step():
        outs = step()
        for o in outs:
            if list(o.prompt_token_ids) == row2:  # row 2's last position, one entry
                last = o.prompt_logprobs[-1]
                next(iter(last.values())).logprob = float("nan")
        return outs

    kld.llm.llm_engine.step = poisoning_step
    got = kld(batch)
    errors = got.column("error").to_pylist()
    assert errors[2].startswith(f"exact KLD at output position {len(poisoned) - 1}: the cousin's logprob of id")
    assert "is nan" in errors[2] and got.column("kld_tokens")[2].as_py() is None
    for i in (0, 1, 3, 4, 5):
        assert errors[i] is None
        for c in ("kld_tokens", "rkld_tokens", "tail_mass_tokens"):
            assert got.column(c)[i].as_py() == clean.column(c)[i].as_py()
    assert all(x == 0.0 for r in clean.column("tail_mass_tokens").to_pylist() for x in r)  # no padded rows here


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
                      "kld_tokens": [[0.5, 0.25], [0.125, 0.0], None], "rkld_tokens": [[0.75, None], [0.25, 0.0], None],
                      "tail_mass_tokens": [[0.0, 0.03125], [0.0, 0.0], None], "engine_time_s": [0.1] * 3,
                      "error": [None, None, "engine failed on this batch"]}, schema=schema.KLD)
    topk = cmp.compare("c", _gens(keys, outs), _gens(keys, outs), _scores(keys, outs), _scores(keys, outs))
    rows = cmp.compare("c", _gens(keys, outs), _gens(keys, outs), _scores(keys, outs), _scores(keys, outs),
                       exact_kld=exact).to_pylist()
    assert rows[0]["kld_tokens"] == [0.125, 0.0] and rows[0]["kld_mean"] == 0.0625 and rows[0]["kld_max"] == 0.125
    assert rows[2]["kld_tokens"] == [0.5, 0.25]
    assert rows[2]["rkld_tokens"] == [0.75, None] and rows[2]["tail_mass_tokens"] == [0.0, 0.03125]
    assert topk.to_pylist()[0]["rkld_tokens"] is None  # top-k mode has no reverse KLD
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

    from cousins.engine import actors
    from cousins.engine import rows as engine_rows
    from cousins.engine import backend as engine
    from cousins.engine.kld_actor import KldActor
    from cousins.family.quantize import build_quantized

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
        rows = gen(engine_rows.expand_samples(prompts, samples=1, base_seed=3)).select(engine_rows.SCORE_INPUT)
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
    from cousins.engine import actors
    from cousins.engine.backend import CORE_ENV, EngineSpec, Sampling
    from cousins.engine.feeder import Feeder
    from cousins.engine.kld_actor import KldActor
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


def _padded_copy(src: str, dst, extra: int, copy_of: list[int], scale: float, seed: int) -> str:
    """`src` with its lm_head (and embeddings, and config.vocab_size) `extra` rows wider, the new
    head rows copies of the rows of `copy_of` times `scale`: ids past the tokenizer that take real
    mass wherever those tokens are likely. The rest of the head is perturbed slightly (seed)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    w = m.lm_head.weight.data
    gen = torch.Generator().manual_seed(seed)
    head = torch.cat([w + 0.05 * w.std() * torch.randn(w.shape, generator=gen), scale * w[copy_of[:extra]]])
    emb = m.model.embed_tokens.weight.data
    emb = torch.cat([emb, torch.zeros(extra, emb.shape[1])])  # ids past the tokenizer are never fed
    m.model.embed_tokens = torch.nn.Embedding.from_pretrained(emb, freeze=False)
    m.lm_head = torch.nn.Linear(w.shape[1], head.shape[0], bias=False)
    m.lm_head.weight.data = head
    m.config.vocab_size = head.shape[0]
    m.save_pretrained(str(dst))
    return str(dst)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_exact_kld_on_vllm_with_padded_heads_of_different_widths_equals_transformers(tiny_teacher, tmp_path):
    """The Qwen2.5-7B-against-1.5B case in small: two copies of the tiny teacher whose heads are
    64 and 32 rows past the tokenizer (2,112 and 2,080 wide against 2,048 tokens), the padded rows
    holding a few % of the mass. The exact-KLD actor's per-token KL both ways and tail mass, by
    either route (hidden states, vLLM's lists), equal a transformers float64 computation over the
    tokenizer's ids plus one tail bucket."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cousins.engine import backend as engine
    from cousins.engine.kld_actor import KldActor

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    vocab = len(tok)
    texts = ["def main(args):\n    return sorted(args, key=len)\n", "What is 7 times 9? The answer is 63.",
             "import os\nfor name in os.listdir(path):\n    print(name)\n", "class Point:\n    x: int\n    y: int\n"]
    counts = np.bincount(np.concatenate([tok.encode(t, add_special_tokens=False) for t in texts * 4]),
                         minlength=vocab)
    common = np.argsort(-counts, kind="stable").tolist()  # frequent tokens: their copies take mass
    original = _padded_copy(tiny_teacher, tmp_path / "pad64", 64, common, 0.6, seed=0)
    cousin = _padded_copy(tiny_teacher, tmp_path / "pad32", 32, common[5:], 0.5, seed=1)

    def spec(name, path):
        return engine.EngineSpec(model_name=name, model_path=path, dtype="float32", quantization=None,
                                 max_model_len=256, kv_cache_bytes=64 << 20, tensor_parallel_size=1, max_num_seqs=64,
                                 enforce_eager=True, max_logprobs=20,
                                 gpu_memory_utilization=0.4 if cuda_gpus() else None)

    # teacher-forced rows need no generation: prompts and "outputs" are the texts' tokens
    rows = pa.table({"prompt_id": [f"p{i}" for i in range(len(texts))], "sample_index": [0] * len(texts),
                     "prompt_text": [t[: len(t) // 3] for t in texts],
                     "output_token_ids": [tok.encode(t[len(t) // 3:], add_special_tokens=False) for t in texts],
                     "error": [None] * len(texts)})
    models = {p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float64).eval() for p in (original, cousin)}

    def logprobs(path, ids):
        with torch.no_grad():
            return torch.log_softmax(models[path](torch.tensor([ids])).logits[0].double(), dim=-1).numpy()

    wants = []
    for row in rows.to_pylist():
        y = row["output_token_ids"]
        ids = tok.encode(row["prompt_text"], add_special_tokens=False) + y
        at = slice(len(ids) - len(y) - 1, len(ids) - 1)  # the positions that predict the output tokens
        lp, lq = logprobs(original, ids)[at], logprobs(cousin, ids)[at]
        assert lp.shape[1] == vocab + 64 and lq.shape[1] == vocab + 32
        wants.append(reference(lp, lq, vocab))
    for route in ("lists", "hidden"):
        with hide_context_proxies():
            got = KldActor(spec("pad64", original), spec("pad32", cousin), route=route)(rows)
            gc.collect()
        assert got.column("error").null_count == got.num_rows, got.column("error").to_pylist()
        tails, mine, ref = [], [], []
        for want, k, r, t in zip(wants, *(got.column(c).to_pylist() for c in
                                          ("kld_tokens", "rkld_tokens", "tail_mass_tokens"))):
            np.testing.assert_allclose(k, want[:, 0], rtol=0.01, atol=1e-5)
            np.testing.assert_allclose(r, want[:, 1], rtol=0.01, atol=1e-5)
            np.testing.assert_allclose(t, want[:, 2], rtol=0.01, atol=1e-6)
            tails += t
            mine += k
            ref += want[:, 0].tolist()
        assert 0.01 < np.mean(tails) < 0.1  # the padded rows matter here: a few % of the mass
        print(f"\npadded heads, {route}: exact KLD over {len(ref)} tokens: mean {np.mean(mine):.6g} (transformers "
              f"float64 {np.mean(ref):.6g}), tail mass mean {np.mean(tails):.3%}")


def test_a_batch_goes_through_the_engines_in_groups_bounded_by_logprob_entries(monkeypatch):
    """With a budget of 25 positions of the fake's 40-entry vocabulary per engine call, a batch of
    rows of ~20-30 positions is scored a row or two at a time, with the same numbers as in one go."""
    from cousins.engine import kld_actor as kld_mod
    from cousins.engine.kld_actor import KldActor
    from fake_engine import FakeBackend

    spec, cousin, batch = _fake_pair_and_batch(monkeypatch)
    whole = KldActor(spec, cousin, backend=FakeBackend())(batch)
    grouped = KldActor(spec, cousin, backend=FakeBackend())
    calls = []
    run = grouped.ref_feeder.run
    grouped.ref_feeder.run = lambda prompts, *a: calls.append(len(prompts)) or run(prompts, *a)
    monkeypatch.setattr(kld_mod, "LOGPROB_ENTRIES_IN_FLIGHT", 25 * 41)
    got = grouped(batch)
    assert len(calls) > 2 and sum(calls) == 6
    for c in ("kld_tokens", "rkld_tokens", "tail_mass_tokens", "error"):
        assert got.column(c).to_pylist() == whole.column(c).to_pylist()
