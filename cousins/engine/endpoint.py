"""An OpenAI-compatible endpoint (a vLLM server, a provider, a gateway) as the engine actors will
reach it: bounded, retried requests whose failures are values, not exceptions.

`Client` keeps at most `max_concurrency` requests in flight and starts at most `requests_per_s` a
second; a request is retried on 429, 5xx, timeouts and broken connections, with exponential
backoff from `backoff_s` (a server's `Retry-After` honoured, up to `timeout_s`), `retries` times;
one that still fails, or answers what is not JSON, gives a `Reply` with the error (status and the
server's message), so its row becomes an error row and the rest go on. `served_models` asks the
server for its models before any work: a dead or wrong URL is one line naming the URL and the status.

The API key is read from the environment variable `api_key_env` when a request is sent; it is never
kept in a field, an error, a repr or a log line.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Endpoint:
    url: str  # the API's base, e.g. http://127.0.0.1:8000/v1
    model: str  # the name the server serves the model under
    api_key_env: str | None = None  # the environment variable holding the key (never the key)
    api: str = "completions"  # or "chat": the server renders the prompt with its own template
    max_concurrency: int = 16
    requests_per_s: float | None = None
    timeout_s: float = 60.0  # one attempt's limit
    retries: int = 4
    backoff_s: float = 0.5


class EndpointError(RuntimeError):
    pass


@dataclass
class Reply:
    body: dict | None  # the decoded JSON answer, None when the request failed
    error: str | None = None  # why, with the status and the server's message
    attempts: int = 1
    seconds: float = 0.0


def _headers(ep: Endpoint) -> dict:
    headers = {"Content-Type": "application/json"}
    if ep.api_key_env:
        key = os.environ.get(ep.api_key_env)
        if not key:
            raise EndpointError(f"endpoint {ep.url}: the environment variable {ep.api_key_env} "
                                f"(its API key) is not set")
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _message(response) -> str:
    """The server's own words for an error: OpenAI's {"error": {"message"}}, else the text's start."""
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        text = err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        text = response.text
    return " ".join(str(text).split())[:300]


class _Rate:
    """At most `per_s` starts a second, shared by the client's threads."""

    def __init__(self, per_s: float | None):
        self.gap = 1.0 / per_s if per_s else 0.0
        self.lock, self.next = threading.Lock(), 0.0

    def wait(self) -> None:
        if not self.gap:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.gap
        time.sleep(max(0.0, start - now))


@dataclass
class Client:
    ep: Endpoint
    _http: object = field(init=False, repr=False)
    _pool: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self):
        import httpx

        self._http = httpx.Client(timeout=self.ep.timeout_s,
                                  limits=httpx.Limits(max_connections=self.ep.max_concurrency))
        self._pool = ThreadPoolExecutor(self.ep.max_concurrency, thread_name_prefix="cousins-endpoint")
        self._rate = _Rate(self.ep.requests_per_s)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def post(self, path: str, body: dict) -> Reply:
        """One request, retried as the module says; never raises for what the server or the network does."""
        import httpx

        ep, url = self.ep, f"{self.ep.url.rstrip('/')}/{path.lstrip('/')}"
        t0 = time.monotonic()
        error = "not sent"
        for attempt in range(1, ep.retries + 2):
            self._rate.wait()
            wait = ep.backoff_s * 2 ** (attempt - 1)
            try:
                r = self._http.post(url, json=body, headers=_headers(ep))
            except httpx.TimeoutException:
                error = f"{url}: no answer within {ep.timeout_s:g} s"
            except httpx.TransportError as e:
                error = f"{url}: {type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        return Reply(r.json(), None, attempt, time.monotonic() - t0)
                    except ValueError:
                        error = f"{url}: HTTP 200 but the body is not JSON: {' '.join(r.text.split())[:200]!r}"
                else:
                    error = f"{url}: HTTP {r.status_code}: {_message(r)}"
                    if r.status_code not in RETRY_STATUS:
                        return Reply(None, error, attempt, time.monotonic() - t0)
                    after = r.headers.get("Retry-After", "")
                    if after.replace(".", "", 1).isdigit():
                        wait = min(float(after), ep.timeout_s)
            if attempt <= ep.retries:
                time.sleep(wait)
        return Reply(None, f"{error} (after {ep.retries + 1} attempts)", ep.retries + 1, time.monotonic() - t0)

    def submit(self, path: str, body: dict):
        """`post` in the client's pool: a Future of its Reply (at most `max_concurrency` run at once)."""
        return self._pool.submit(self.post, path, body)

    def post_many(self, path: str, bodies: list[dict]) -> list[Reply]:
        """Every body, at most `max_concurrency` in flight; the replies in the bodies' order."""
        return list(self._pool.map(lambda b: self.post(path, b), bodies))


def served_models(ep: Endpoint, timeout_s: float = 10.0) -> dict[str, str | None]:
    """The models the server serves ({id: owned_by}; vLLM says "vllm"), or EndpointError in one
    line naming the URL and the status, or that it does not serve `ep.model`."""
    import httpx

    url = f"{ep.url.rstrip('/')}/models"
    try:
        r = httpx.get(url, headers=_headers(ep), timeout=timeout_s)
    except httpx.HTTPError as e:
        raise EndpointError(f"endpoint {url} is unreachable: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise EndpointError(f"endpoint {url}: HTTP {r.status_code}: {_message(r)}")
    try:
        served = {m["id"]: m.get("owned_by") for m in r.json()["data"]}
    except (ValueError, KeyError, TypeError):
        raise EndpointError(f"endpoint {url}: not an OpenAI-compatible model list: {r.text[:200]!r}") from None
    if ep.model not in served:
        raise EndpointError(f"endpoint {url} does not serve {ep.model!r}; it serves {', '.join(map(repr, served))}")
    return served
