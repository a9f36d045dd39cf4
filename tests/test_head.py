"""The exact-KLD hidden route (cousins/engine/head.py, cousins/engine/kld_actor.py): a model's head read
from its checkpoint and applied as vLLM applies it, which heads are refused and why (decided before
Ray), and the route's rows against the lists route's on the fake engine. The route against vLLM's
own full-vocabulary logprobs on real checkpoints: tests/test_realistic.py and tests/test_kld.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import compose
from cousins.contract.config import ConfigError, to_config
from cousins.drift.vocab_kld import PositionError
from cousins.engine.head import Head, HeadError, exact_from_hidden, head_problem, load_head
from test_kld import _fake_pair_and_batch, reference

QWEN = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 48, "hidden_size": 8, "tie_word_embeddings": False}


def _checkpoint(path, config: dict, tensors: dict, shards: int = 1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return str(path)
    where = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, str(path / file))
        where.update((k, file) for k in part)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": where}))
    return str(path)


def test_which_heads_are_refused_and_why():
    assert head_problem(QWEN) is None
    ct = {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"]}}}
    assert head_problem({**QWEN, "quantization_config": {**ct, "ignore": ["lm_head"]}}) is None
    assert head_problem({**QWEN, "quantization_config": {**ct, "ignore": ["re:.*lm_head"]}}) is None
    assert "quantized" in head_problem({**QWEN, "quantization_config": {**ct, "ignore": []}})
    assert "lm_head: true" in head_problem({**QWEN, "quantization_config": {"quant_method": "gptq", "lm_head": True}})
    assert head_problem({**QWEN, "quantization_config": {"quant_method": "gptq", "lm_head": False}}) is None
    assert "dim_model_base" in head_problem({**QWEN, "dim_model_base": 256})
    assert "trust_remote_code" in head_problem(QWEN, trust_remote_code=True)
    assert "GGUF" in head_problem(QWEN, gguf=True)
    assert "unmerged" in head_problem(QWEN, lora_served=True)


def test_a_local_checkpoint_without_safetensors_is_refused_before_ray(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert "not in safetensors files" in head_problem(QWEN, path=str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert head_problem(QWEN, path=str(tmp_path)) is None


def test_a_head_is_read_as_the_checkpoint_stores_it_tied_sharded_biased_or_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb, head, bias = (torch.randn(48, 8, generator=g), torch.randn(48, 8, generator=g), torch.randn(48, generator=g))
    other = {"model.norm.weight": torch.ones(8), "model.embed_tokens.weight": emb}
    own = load_head(_checkpoint(tmp_path / "own", QWEN, {**other, "lm_head.weight": head}), QWEN, torch.float32)
    assert torch.equal(own.weight, head) and own.bias is None
    tied_cfg = {**QWEN, "tie_word_embeddings": True}
    tied = load_head(_checkpoint(tmp_path / "tied", tied_cfg, dict(other)), tied_cfg, torch.float32)
    assert torch.equal(tied.weight, emb)
    # tied in the config: the embedding even where a stale lm_head.weight is stored (as vLLM and HF do)
    stale = load_head(_checkpoint(tmp_path / "stale", tied_cfg, {**other, "lm_head.weight": head}), tied_cfg,
                      torch.float32)
    assert torch.equal(stale.weight, emb)
    sharded = _checkpoint(tmp_path / "sharded", QWEN, {**other, "lm_head.weight": head, "lm_head.bias": bias}, shards=2)
    with_bias = load_head(sharded, QWEN, torch.bfloat16)
    assert with_bias.weight.dtype == torch.bfloat16 and torch.equal(with_bias.bias, bias.to(torch.bfloat16))
    quantized = {"lm_head.weight_packed": torch.zeros(48, 1, dtype=torch.int32),
                 "lm_head.weight_scale": torch.ones(48, 1)}
    packed = _checkpoint(tmp_path / "packed", QWEN, {**other, **quantized})
    with pytest.raises(HeadError, match=r"stored quantized \(lm_head.weight_packed, lm_head.weight_scale\)"):
        load_head(packed, QWEN, torch.float32)
    int8 = _checkpoint(tmp_path / "int8", QWEN, {**other, "lm_head.weight": torch.zeros(48, 8, dtype=torch.int8)})
    with pytest.raises(HeadError, match="int8"):
        load_head(int8, QWEN, torch.float32)


def test_the_heads_transforms_are_applied_as_vllm_applies_them():
    g = torch.Generator().manual_seed(1)
    w, b, h = torch.randn(48, 8, generator=g), torch.randn(48, generator=g), 3 * torch.randn(5, 8, generator=g)
    logits = (h.double() @ w.double().T) + b.double()
    for cap, scale in ((None, 1.0), (2.0, 1.0), (None, 0.25), (30.0, 0.5)):
        want = logits if cap is None else cap * torch.tanh(logits / cap)
        want = torch.log_softmax(want * scale, dim=-1)
        got = Head(weight=w.double(), bias=b.double(), soft_cap=cap, scale=scale).logprobs(h)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    from cousins.engine.head import _transforms

    assert _transforms({"final_logit_softcapping": 30.0}) == (30.0, 1.0)
    assert _transforms({"logit_scale": 0.0625}) == (None, 0.0625)  # Cohere: multiplies
    assert _transforms({"logits_scaling": 8.0}) == (None, 0.125)  # Granite: divides


@pytest.mark.parametrize("chunk_cells", [1, 200, 1 << 20])
def test_kld_from_hidden_states_equals_the_float64_reference_with_padded_heads(chunk_cells):
    """Heads 7 and 3 rows past a 40-token vocabulary, their padded rows holding a little mass: the
    per-position KL both ways and tail mass equal the reference over ids < V plus one tail bucket."""
    g = torch.Generator().manual_seed(2)
    vocab, n = 40, 17
    wp = torch.randn(vocab + 7, 6, generator=g, dtype=torch.float64)
    wq = torch.cat([wp[:vocab + 3, :5] + 0.1 * torch.randn(vocab + 3, 5, generator=g, dtype=torch.float64)], 0)
    hp = torch.randn(n, 6, generator=g, dtype=torch.float64)
    hq = hp[:, :5] + 0.05 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    head_p, head_q = Head(weight=wp), Head(weight=wq)
    got = exact_from_hidden(hp, hq, head_p, head_q, vocab, chunk_cells=chunk_cells)
    want = reference(head_p.logprobs(hp).numpy(), head_q.logprobs(hq).numpy(), vocab)
    np.testing.assert_allclose(got.kld, want[:, 0], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(got.rkld, want[:, 1], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(got.tail_mass, want[:, 2], rtol=1e-9)
    assert (got.tail_mass > 1e-4).all()
    # a head exactly V wide against a padded one: the padded side renormalised over V (reduce_dense's rule)
    from cousins.drift.vocab_kld import reduce_dense

    narrow = Head(weight=wq[:vocab])
    for a, b, ha, hb in ((hp, hq, head_p, narrow), (hq, hp, narrow, head_p)):
        one = exact_from_hidden(a, b, ha, hb, vocab, chunk_cells=chunk_cells)
        ref = reduce_dense(ha.logprobs(a), hb.logprobs(b), vocab, 0)
        for k in ("kld", "rkld", "tail_mass"):
            np.testing.assert_allclose(getattr(one, k), getattr(ref, k), rtol=1e-9, atol=1e-13)
        assert (one.tail_mass > 1e-4).all()
    # rows reduced together, the heads' matmul over blocks across rows (or splitting them): the same
    # figures row by row, and a row whose state is NaN an error of its own
    from cousins.engine.head import exact_rows

    cut = [0, 5, 6, 17]
    rows_p, rows_q = [hp[a:b] for a, b in zip(cut, cut[1:])], [hq[a:b] for a, b in zip(cut, cut[1:])]
    rows_q[1] = rows_q[1].clone().fill_(math.nan)
    for block_cells in (1, 3 * (vocab + 7), 1 << 20):
        got_rows = exact_rows(rows_p, rows_q, head_p, head_q, vocab, chunk_cells, block_cells)
        assert isinstance(got_rows[1], PositionError) and got_rows[1].position == 0
        for r in (0, 2):
            np.testing.assert_allclose(got_rows[r].kld, got.kld[cut[r]:cut[r + 1]], rtol=1e-12, atol=1e-15)
    # a head narrower than the vocabulary (ids past it have probability 0): as the lists route reads it
    # (the original's: the cousin's mass there makes KL(q ‖ p) infinite, null, and KL(p ‖ q) finite)
    short = Head(weight=wq[:vocab - 2])
    got_short = exact_from_hidden(hq, hp, short, head_p, vocab, chunk_cells=chunk_cells)
    ref_short = reduce_dense(torch.nn.functional.pad(short.logprobs(hq), (0, 2), value=-math.inf),
                             head_p.logprobs(hp), vocab, 0)
    np.testing.assert_allclose(got_short.kld, ref_short.kld, rtol=1e-9, atol=1e-13)
    assert np.isnan(got_short.rkld).all() and np.isnan(ref_short.rkld).all()
    same = exact_from_hidden(hp, hp, head_p, head_p, vocab, chunk_cells=chunk_cells)
    assert np.abs(same.kld).max() < 1e-15
    bad = hq.clone()
    bad[11, 2] = math.nan
    with pytest.raises(PositionError, match=r"output position 11: the cousin's logprob of id 0 is nan"):
        exact_from_hidden(hp, bad, head_p, head_q, vocab, chunk_cells=chunk_cells)
    # the cousin's padded rows at probability 0 where the original's hold mass: KL(p ‖ q) is infinite
    dead = Head(weight=wq, bias=torch.cat([torch.zeros(vocab), torch.full((3,), -math.inf)]).double())
    with pytest.raises(PositionError, match=r"output position 0: the cousin gives probability 0 to its ids ≥"):
        exact_from_hidden(hp, hq, head_p, dead, vocab, chunk_cells=chunk_cells)


@pytest.mark.parametrize("reorder", [False, True])
def test_the_hidden_route_gives_the_lists_routes_rows(monkeypatch, reorder):
    """On the fake engine (its hidden state: the one-hot of the token; its head: the toy model's
    table), both routes give the same KLD rows, the noise floor's reordered pass too."""
    from cousins.engine.kld_actor import KldActor
    from fake_engine import FakeBackend

    spec, cousin, batch = _fake_pair_and_batch(monkeypatch)
    lists = KldActor(spec, cousin, backend=FakeBackend(), reorder=reorder)(batch)
    actor = KldActor(spec, cousin, backend=FakeBackend(), reorder=reorder, route="hidden")
    hidden = actor(batch)
    assert actor.llm.runner == "pooling" and actor.reference.runner == "pooling"
    assert hidden.column("error").null_count == hidden.num_rows
    for c in ("kld_tokens", "rkld_tokens", "tail_mass_tokens"):
        for a, b in zip(hidden.column(c).to_pylist(), lists.column(c).to_pylist()):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert sum(len(x) for x in hidden.column("kld_tokens").to_pylist()) == \
        sum(len(x) for x in batch.column("output_token_ids").to_pylist())


def test_a_bad_position_is_the_same_error_row_on_both_routes(monkeypatch):
    """A NaN in the cousin's distribution of one position of row 2: an error row naming that
    position on the hidden route as on the lists route (tests/test_kld.py), the other rows intact."""
    from cousins.engine.kld_actor import KldActor
    from fake_engine import FakeBackend

    spec, cousin, batch = _fake_pair_and_batch(monkeypatch)
    clean = KldActor(spec, cousin, backend=FakeBackend(), route="hidden")(batch)
    actor = KldActor(spec, cousin, backend=FakeBackend(), route="hidden")
    poisoned = batch.column("output_token_ids")[2].as_py()
    row2 = actor.tokenizer.encode(batch.column("prompt_text")[2].as_py()) + poisoned
    encode = actor.llm.encode

    def poisoning(prompts, **kw):
        outs = encode(prompts, **kw)
        for p, o in zip(prompts, outs):
            if p["prompt_token_ids"] == row2:
                o.outputs.data[-2, 0] = math.nan  # the state that predicts the output's last token
        return outs

    actor.llm.encode = poisoning
    got = actor(batch)
    errors = got.column("error").to_pylist()
    assert errors[2] == (f"exact KLD at output position {len(poisoned) - 1}: the cousin's logprob of id 0 is nan: "
                         "the engine returned a non-finite logprob")
    for i in (0, 1, 3, 4, 5):
        assert errors[i] is None and got.column("kld_tokens")[i].as_py() == clean.column("kld_tokens")[i].as_py()


def test_a_batch_goes_through_the_hidden_route_in_groups_bounded_by_hidden_entries(monkeypatch):
    from cousins.engine import kld_actor as kld_mod
    from cousins.engine.kld_actor import KldActor
    from fake_engine import FakeBackend

    spec, cousin, batch = _fake_pair_and_batch(monkeypatch)
    whole = KldActor(spec, cousin, backend=FakeBackend(), route="hidden")(batch)
    grouped = KldActor(spec, cousin, backend=FakeBackend(), route="hidden")
    calls = []
    run = grouped.ref_feeder.run
    grouped.ref_feeder.run = lambda prompts, *a: calls.append(len(prompts)) or run(prompts, *a)
    monkeypatch.setattr(kld_mod, "HIDDEN_ENTRIES_IN_FLIGHT", 25 * 40)  # 25 positions of the fake's 40-wide states
    got = grouped(batch)
    assert len(calls) > 2 and sum(calls) == 6
    for c in ("kld_tokens", "rkld_tokens", "tail_mass_tokens", "error"):
        assert got.column(c).to_pylist() == whole.column(c).to_pylist()


def test_an_engine_that_breaks_on_the_hidden_route_fails_the_batch_as_on_the_other(monkeypatch):
    from cousins.engine.kld_actor import KldActor
    from fake_engine import FakeBackend

    spec, cousin, batch = _fake_pair_and_batch(monkeypatch)
    actor = KldActor(spec, cousin, backend=FakeBackend(), route="hidden")
    actor.llm.llm_engine.dead = True
    with pytest.raises(RuntimeError, match="engine broken: RuntimeError: the fake engine crashed"):
        actor(batch)


def _model(path, config: dict) -> str:
    """A checkpoint's config.json and (empty) weights file: what the route is chosen from."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"")
    return str(path)


def test_the_route_is_chosen_and_printed_before_ray_and_a_forced_one_refused_with_every_reason(
        tiny_teacher, tmp_path, capsys):
    from cousins.engine import plan
    from cousins.family.prepare import check_kld_routes

    quantized = _model(tmp_path / "q", {**QWEN, "quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"]}}, "ignore": []}})
    plain = _model(tmp_path / "p", QWEN)
    base = ["drift.kld=exact", f"model.path={tiny_teacher}", "cousins=none", f"+cousins.q.path={quantized}",
            "+cousins.q.kind=quantized", f"+cousins.p.path={plain}", "+cousins.p.kind=quantized"]
    cfg = to_config(compose(*base, config_name="drift"))
    assert plan.kld_route(cfg, "p") == ("hidden", None)
    route, why = plan.kld_route(cfg, "q")
    assert route == "lists" and "its head cannot be applied: its head is quantized" in why
    assert plan.kld_route(cfg, "noise-floor") == ("hidden", None)
    check_kld_routes(cfg)
    out = capsys.readouterr().out
    assert "exact KLD of 'p': final hidden states" in out and "exact KLD of 'q': vLLM's full-vocabulary logprobs" in out
    forced = to_config(compose(*base, "drift.kld_route=hidden", "+cousins.r.kind=quantized",
                               f"+cousins.r.path={quantized}", config_name="drift"))
    with pytest.raises(ConfigError) as info:
        check_kld_routes(forced)
    assert [p.split(":")[0] for p in info.value.problems] == ["cousins.q", "cousins.r"]
    lists = to_config(compose(*base, "drift.kld_route=lists", config_name="drift"))
    assert plan.kld_route(lists, "p") == ("lists", "drift.kld_route=lists")
    unreadable = to_config(compose(*base[:-2], f"+cousins.p.path={tmp_path / 'nothing'}", "+cousins.p.kind=quantized",
                                   config_name="drift"))
    route, why = plan.kld_route(unreadable, "p")
    assert route == "lists" and "its config cannot be read here" in why
