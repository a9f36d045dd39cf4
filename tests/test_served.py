"""A model behind an OpenAI-compatible endpoint through the engine actors (cousins/engine/served.py),
against a real HTTP server on 127.0.0.1 that answers as vLLM's does from the fake engine's toy
models (tests/fake_server.py): the rows equal those of the same model on a local (fake) engine,
and a request that fails after its retries is its row's error row, nothing else lost."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from conftest import free_port
from cousins.contract import schema
from cousins.engine import actors
from cousins.engine.backend import Sampling
from cousins.engine.endpoint import Endpoint
from fake_engine import FakeBackend
from fake_server import FakeServer
from test_actors import SPEC, rows

SAME = ["prompt_id", "sample_index", "seed", "model", "output_text", "output_token_ids", "output_logprobs",
        "topk_token_ids", "topk_logprobs", "finish_reason", "prompt_tokens", "output_tokens", "error"]


@pytest.fixture
def server():
    s = FakeServer({"served-fake": SPEC.model_path})
    yield s
    s.stop()


def served(server: FakeServer, **kw):
    return dataclasses.replace(SPEC, endpoint=Endpoint(url=server.url, model="served-fake", backoff_s=0.01, **kw))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generation_through_an_endpoint_equals_the_same_model_on_a_local_engine(server, temperature):
    sampling = Sampling(temperature=temperature, top_p=1.0, top_k=0, max_tokens=12, logprobs=4)
    batch = rows(10, samples=2)
    local = actors.EngineActor(SPEC, sampling, backend=FakeBackend())(batch)
    remote = actors.EngineActor(served(server), sampling, backend=FakeBackend())(batch)
    assert remote.schema == schema.GENERATIONS
    assert remote.select(SAME).equals(local.select(SAME))
    assert remote.column("error").null_count == remote.num_rows and server.completed == remote.num_rows


def test_a_chat_endpoint_renders_with_the_servers_template_and_its_own_template_is_what_it_measures(server):
    sampling = Sampling(temperature=0.8, top_p=1.0, top_k=0, max_tokens=12, logprobs=3)
    batch = rows(6, samples=2)
    local = actors.EngineActor(SPEC, sampling, backend=FakeBackend())(batch)
    chat = actors.EngineActor(served(server, api="chat"), sampling, backend=FakeBackend())(batch)
    assert chat.select(SAME).equals(local.select(SAME))  # the server's template is ours: the same rows
    seen = []
    server.template = lambda messages: seen.append(messages) or "<system>be brief" + "".join(
        f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>!"  # (the toy model reads the last token)
    other = actors.EngineActor(served(server, api="chat"), sampling, backend=FakeBackend())(batch)
    # every row's messages reached the server's template (in whatever order the concurrent requests came)
    assert sorted(map(repr, seen)) == sorted(map(repr, batch.column("messages").to_pylist()))
    assert other.column("error").null_count == other.num_rows
    assert other.column("output_token_ids").to_pylist() != local.column("output_token_ids").to_pylist()


def test_teacher_forced_scores_through_an_endpoint_equal_a_local_engines(server):
    gens = actors.EngineActor(SPEC, Sampling(temperature=0.7, top_p=1.0, top_k=0, max_tokens=10, logprobs=5),
                              backend=FakeBackend())(rows(6))
    local = actors.ScoreActor(SPEC, topk=5, backend=FakeBackend())(gens)
    remote = actors.ScoreActor(served(server), topk=5, backend=FakeBackend())(gens)
    cols = ["prompt_id", "sample_index", "model", "topk_token_ids", "topk_logprobs", "token_logprobs", "error"]
    assert remote.schema == schema.SCORES and remote.select(cols).equals(local.select(cols))


def test_failed_requests_become_their_rows_errors_and_transient_ones_are_retried(server):
    """Request 0 fails 500 every time, request 1 answers garbage every time, request 2 is refused
    (400, not retried); the others meet a 429 or a dropped connection once, then answer."""
    order: dict[str, int] = {}
    attempts: dict[str, int] = {}

    def faults(n, body):
        key = str(body["prompt"])
        i = order.setdefault(key, len(order))
        attempts[key] = attempts.get(key, 0) + 1
        once = attempts[key] == 1
        return {0: "500", 1: "garbage", 2: "400"}.get(i) or ({3: "429", 4: "drop"}.get(i) if once else None)

    server.faults = faults
    sampling = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=8, logprobs=2)
    batch = rows(8)
    out = actors.EngineActor(served(server, retries=2), sampling, backend=FakeBackend())(batch)
    assert schema.row_keys(out) == schema.row_keys(batch)
    errors = dict(zip(out.column("prompt_id").to_pylist(), out.column("error").to_pylist()))
    bad = {k: v for k, v in errors.items() if v is not None}
    assert len(bad) == 3, bad
    reasons = sorted(bad.values())
    assert any("HTTP 500: engine exploded (after 3 attempts)" in r for r in reasons)
    assert any("HTTP 400: this request is refused" in r and "attempts" not in r for r in reasons)
    assert any("not JSON" in r for r in reasons)
    assert max(attempts.values()) == 3 and sorted(attempts.values()).count(2) == 2  # 500/garbage; 429, drop
    local = actors.EngineActor(SPEC, sampling, backend=FakeBackend())(batch)
    keep = pa.array([e is None for e in out.column("error").to_pylist()])
    assert out.filter(keep).select(SAME).equals(local.filter(keep).select(SAME))


def test_a_server_that_is_down_or_does_not_serve_the_model_fails_the_cousins_rows_with_the_reason(server):
    sampling = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=8, logprobs=0)
    wrong = dataclasses.replace(SPEC, endpoint=Endpoint(url=server.url, model="other"))
    a = actors.EngineActor(wrong, sampling, backend=FakeBackend(), tolerate_load_failure=True)
    out = a(rows(2))
    assert all("does not serve 'other'" in e and server.url in e for e in out.column("error").to_pylist())


def test_endpoint_settings_are_checked_together_before_ray(tiny_config):
    from cousins.contract.config import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_config("model.endpoint={url: 'ftp://x', model: m, api: text, max_concurrency: 0, api_key_env: 'sk-1'}",
                    "+cousins.q={quantization: fp8_per_channel, endpoint: {url: 'http://127.0.0.1:1/v1'}}",
                    "drift.kld=exact")
    text = str(e.value)
    for part in ("model.endpoint.url 'ftp://x' must start with http", "model.endpoint.api 'text' must be one of",
                 "max_concurrency must be >= 1", "api_key_env 'sk-1': name the environment variable",
                 "cousins.q.endpoint.model: name the model"):
        assert part in text, (part, text)
    with pytest.raises(ConfigError) as e:
        tiny_config("+cousins.q={quantization: fp8_per_channel, endpoint: {url: 'http://127.0.0.1:1/v1', model: m}}",
                    "drift.kld=exact")
    assert "cousins.q: quantization describe a model run by an engine of ours" in str(e.value)
    assert "drift.kld=exact needs every position's whole distribution" in str(e.value)


def test_a_dead_url_or_a_text_only_server_is_refused_before_ray_in_one_line_each(tiny_config, server):
    import time

    from cousins.contract.config import ConfigError
    from cousins.family.prepare import check_models

    dead = f"http://127.0.0.1:{free_port()}/v1"
    other = FakeServer({"m": "/models/fake"}, owned_by="someone")
    try:
        cfg = tiny_config(f"+cousins.gone={{endpoint: {{url: '{dead}', model: m}}}}",
                          f"+cousins.plain={{endpoint: {{url: '{other.url}', model: m}}}}",
                          f"+cousins.words={{text_only: true, endpoint: {{url: '{other.url}', model: m}}}}")
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as e:
            check_models(cfg, scoring=True)
        assert time.monotonic() - t0 < 15
        problems = e.value.problems
        assert len(problems) == 2, problems
        assert problems[0].startswith(f"cousins.gone.endpoint: endpoint {dead}/models is unreachable")
        assert problems[1].startswith(f"cousins.plain.endpoint: {other.url} is not a vLLM server")
        with pytest.raises(ConfigError) as e:
            check_models(cfg)  # a generation run needs no teacher-forced scores: only the dead URL is left
        assert len(e.value.problems) == 1 and e.value.problems[0].startswith("cousins.gone.endpoint")
    finally:
        other.stop()
