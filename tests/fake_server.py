"""An OpenAI-compatible server on 127.0.0.1 answering as vLLM's does, from the fake engine's toy
models (tests/fake_engine.py): a model served here gives the same tokens and logprobs as the same
model on a FakeBackend engine, so a run against the server can be compared row by row with a local
one. `faults(n, body)` scripts the n-th completion request: None (answer), or "429", "500",
"400", "garbage", "stall", "drop" (close the connection)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from fake_engine import Params, Tokenizer, _Model, _Request

TOKEN_ID = "token_id:"


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None) -> None:
    """One HTTP answer; a client that gave up on it (a stalled request) is not an error here."""
    handler.send_response(status)
    for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    try:
        handler.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _top(position: dict, tok: Tokenizer, as_ids: bool) -> dict:
    return {(f"{TOKEN_ID}{t}" if as_ids else tok.decode([t])): lp.logprob for t, lp in position.items()}


class FakeServer:
    def __init__(self, models: dict[str, str], *, owned_by: str = "vllm",
                 faults: Callable[[int, dict], str | None] | None = None, max_model_len: int = 4096,
                 template: Callable[[list[dict]], str] | None = None):
        """`models`: served name -> the fake model's path (what a FakeBackend engine of it loads);
        `template`: how the server renders a chat request's messages (default: the toy tokenizer's
        chat template, the one a local engine renders with)."""
        self.models, self.owned_by, self.faults = models, owned_by, faults
        self.template = template or (lambda messages: Tokenizer().apply_chat_template(messages))
        self.max_model_len = max_model_len
        self.requests, self.completed, self.lock = 0, 0, threading.Lock()
        self.keys: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                send(self, status, body, headers)

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    return self._send(404, b'{"error": {"message": "not found"}}')
                data = [{"id": m, "object": "model", "owned_by": server.owned_by, "max_model_len": server.max_model_len}
                        for m in server.models]
                self._send(200, json.dumps({"object": "list", "data": data}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = server.requests
                    server.requests += 1
                    server.keys.append(self.headers.get("Authorization"))
                fault = server.faults(n, body) if server.faults else None
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": "0.05"})
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "engine exploded"}}')
                if fault == "400":
                    return self._send(400, b'{"error": {"message": "this request is refused"}}')
                if fault == "garbage":
                    return self._send(200, b"<html>gateway hiccup</html>")
                if fault == "stall":
                    time.sleep(2.0)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                path = self.path.rstrip("/")
                if path not in ("/v1/completions", "/v1/chat/completions") or body.get("model") not in server.models:
                    return self._send(404, json.dumps({"error": {"message": f"no model {body.get('model')!r}"}}).encode())
                answer = server.chat(body) if path.endswith("chat/completions") else server.complete(body)
                self._send(200, json.dumps(answer).encode())
                with server.lock:
                    server.completed += 1

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/v1"

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()

    def chat(self, body: dict) -> dict:
        """vLLM's /v1/chat/completions answer: the messages rendered by the server's template."""
        k = body.get("top_logprobs", 0) if body.get("logprobs") else None
        done = self.complete({**body, "prompt": Tokenizer().encode(self.template(body["messages"])), "logprobs": k})
        c = done["choices"][0]
        lp = c.get("logprobs")
        content = None if lp is None else [
            {"token": t, "logprob": own, "top_logprobs": [{"token": key, "logprob": v} for key, v in top.items()]}
            for t, own, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"] or [{}] * len(lp["tokens"]))]
        return {**done, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": c["text"]}, "finish_reason": c["finish_reason"],
            "logprobs": None if content is None else {"content": content}}]}

    def complete(self, body: dict) -> dict:
        """vLLM's /v1/completions answer for one prompt (token ids, or text the toy tokenizer encodes)."""
        tok = Tokenizer()
        prompt = body["prompt"] if isinstance(body["prompt"], list) else tok.encode(body["prompt"])
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        k = body.get("logprobs")
        params = Params(temperature=body.get("temperature", 1.0), max_tokens=body.get("max_tokens", 16),
                        logprobs=max(k or 0, 1), prompt_logprobs=body.get("prompt_logprobs"), seed=body.get("seed"))
        req = _Request("0", prompt, params, _Model(self.models[body["model"]]))
        out = None
        while out is None:
            out = req.step()
        c = out.outputs[0]
        choice = {"index": 0, "text": c.text, "finish_reason": c.finish_reason, "stop_reason": None}
        if out.prompt_logprobs is not None:  # teacher-forced: vLLM's prompt_logprobs, one generated token
            choice["prompt_logprobs"] = [None] + [
                {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": tok.decode([t])}
                 for t, lp in pos.items()} for pos in out.prompt_logprobs[1:]]
        if k is not None:
            positions = c.logprobs or []
            choice["logprobs"] = {
                "tokens": [f"{TOKEN_ID}{t}" if as_ids else tok.decode([t]) for t in c.token_ids],
                "token_logprobs": [pos[t].logprob for pos, t in zip(positions, c.token_ids)],
                "top_logprobs": [_top({t: lp for t, lp in pos.items() if lp.rank <= k or t == own}, tok, as_ids)
                                 for pos, own in zip(positions, c.token_ids)] if k else None,
                "text_offset": list(range(len(c.token_ids)))}
        return {"id": "cmpl-fake", "object": "text_completion", "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(c.token_ids)}}
