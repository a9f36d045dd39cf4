"""The endpoint client (cousins/engine/endpoint.py) against a real HTTP server on 127.0.0.1 that
answers as told: 429 with Retry-After, 500s, a body that is not JSON, a stall past the timeout, a
dead port, a wrong model. Nothing is lost (a failure is a reply with its reason), requests stay
within the concurrency bound, and the API key reaches the server but no error or repr."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import free_port
from cousins.engine.endpoint import Client, Endpoint, EndpointError, served_models as check
from fake_server import send

KEY = "sk-test-secret-value"


class Server:
    """A scripted OpenAI-like server: `script[n]` is what the n-th POST gets (then 200 JSON)."""

    def __init__(self):
        self.script: list = []
        self.posts, self.auth = 0, []
        self.now = self.most = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                send(self, status, body, headers)

            def do_GET(self):
                self._send(200, json.dumps({"data": [{"id": "tiny"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = server.posts
                    server.posts += 1
                    server.auth.append(self.headers.get("Authorization"))
                    server.now += 1
                    server.most = max(server.most, server.now)
                    step = server.script[n] if n < len(server.script) else "ok"
                try:
                    if step == "429":
                        reply = (429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0.05"})
                    elif step == "500":
                        reply = (500, b'{"error": {"message": "engine exploded"}}')
                    elif step == "400":
                        reply = (400, b'{"error": {"message": "max_tokens is too large"}}')
                    elif step == "garbage":
                        reply = (200, b"<html>gateway hiccup</html>")
                    elif step == "stall":
                        time.sleep(1.0)
                        reply = (200, b"{}")
                    else:
                        time.sleep(0.02)
                        reply = (200, json.dumps({"echo": body}).encode())
                finally:
                    # the request is over for the count before its reply goes: a client that has
                    # read the reply may start its next request before this thread runs again
                    with server.lock:
                        server.now -= 1
                self._send(*reply)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/v1"


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.http.shutdown()
    s.http.server_close()


def _client(server, **kw) -> Client:
    return Client(Endpoint(url=server.url, model="tiny", api_key_env="COUSINS_TEST_KEY", timeout_s=0.3,
                           backoff_s=0.01, **kw))


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("COUSINS_TEST_KEY", KEY)


def test_a_429_is_waited_out_and_retried_and_the_key_reaches_the_server(server):
    server.script = ["429", "429"]
    c = _client(server)
    r = c.post("completions", {"prompt": "hi"})
    assert r.body == {"echo": {"prompt": "hi"}} and r.error is None and r.attempts == 3
    assert server.auth == [f"Bearer {KEY}"] * 3
    assert KEY not in repr(c) and KEY not in repr(c.ep)
    c.close()


def test_failures_become_replies_with_the_status_and_the_servers_words(server):
    server.script = ["500"] * 3 + ["400"] + ["garbage"] * 3
    c = _client(server, retries=2)
    five, four, junk = c.post("completions", {}), c.post("completions", {}), c.post("completions", {})
    assert five.body is None and "HTTP 500: engine exploded (after 3 attempts)" in five.error
    assert four.attempts == 1 and "HTTP 400: max_tokens is too large" in four.error  # not retried
    assert "not JSON" in junk.error and "gateway hiccup" in junk.error
    assert all(KEY not in r.error for r in (five, four, junk))
    assert c.post("completions", {"x": 1}).body == {"echo": {"x": 1}}  # the next one is fine
    c.close()


def test_a_stalled_request_times_out_within_its_bound(server):
    server.script = ["stall"] * 2
    c = _client(server, retries=1)
    t0 = time.monotonic()
    r = c.post("completions", {})
    assert r.body is None and "no answer within 0.3 s" in r.error and r.attempts == 2
    assert time.monotonic() - t0 < 10  # bounded by the timeout and the retries, not by the server
    c.close()


def test_many_requests_keep_their_order_and_the_concurrency_bound(server):
    server.script = ["ok", "500", "ok", "429"] * 3  # 6 faults: even one request meeting them all has a 7th try
    c = _client(server, max_concurrency=3, retries=6)
    replies = c.post_many("completions", [{"i": i} for i in range(40)])
    assert [r.body["echo"]["i"] for r in replies] == list(range(40))  # each retried to success, in order
    assert server.most <= 3
    c.close()


def test_the_rate_limit_spaces_the_starts(server):
    c = _client(server, max_concurrency=8, requests_per_s=20)
    t0 = time.monotonic()
    c.post_many("completions", [{}] * 10)
    assert time.monotonic() - t0 >= 9 / 20 - 0.01
    c.close()


def test_check_names_the_url_and_the_status_in_one_line(server, monkeypatch):
    check(Endpoint(url=server.url, model="tiny", api_key_env="COUSINS_TEST_KEY"))
    with pytest.raises(EndpointError, match=r"does not serve 'other'; it serves 'tiny'"):
        check(Endpoint(url=server.url, model="other"))
    dead = free_port()
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=rf"http://127.0.0.1:{dead}/v1/models is unreachable") as e:
        check(Endpoint(url=f"http://127.0.0.1:{dead}/v1", model="tiny"), timeout_s=3)
    assert time.monotonic() - t0 < 10 and "\n" not in str(e.value)
    monkeypatch.delenv("COUSINS_TEST_KEY")
    with pytest.raises(EndpointError, match="COUSINS_TEST_KEY .* is not set"):
        check(Endpoint(url=server.url, model="tiny", api_key_env="COUSINS_TEST_KEY"))
