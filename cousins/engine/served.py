"""An OpenAI-compatible endpoint with the surface the engine actors use of vLLM's `LLM`, so a model
behind a URL runs through the same actors, feeder, ledger and rows as a local engine.

`ServedLLM.enqueue` sends each request through the endpoint's `Client` (cousins/engine/endpoint.py:
bounded concurrency, rate, retries) and `llm_engine.step()` hands back the ones that have answered,
as vLLM's `RequestOutput`s: token ids, the top-k logprobs at each position (a dict per position, as
vLLM gives without flat logprobs), the finish reason and, for teacher-forced scoring, the prompt's
logprobs. A request that still fails after its retries comes back finished with `error` set (its
status and the server's message): the actors make it that row's error row.

What is sent (`/v1/completions`, the prompt the actor rendered with the original's template):
- to a vLLM server (its model list says `owned_by: vllm`): the prompt's token ids, so the server
  sees the tokens a local engine would; `return_tokens_as_token_ids` for exact output ids and top-k
  keys; `prompt_logprobs` for teacher-forced scoring; `top_k` when sampling sets it.
- to any other server: the prompt's text (the server tokenizes it); the output's ids are the
  original's tokenizer's encoding of the text; top-k logprobs only where the server names tokens
  the tokenizer knows. Teacher-forced scoring needs a vLLM server (check_models says so first).

With `api: chat`, generation goes to `/v1/chat/completions` with the row's messages instead: the
server renders them with its own template (and, on vLLM, the model's `chat_template_kwargs`), so a
difference between its template and ours is part of what the run measures. Teacher-forced scoring
still sends the original's rendered token ids to `/v1/completions`.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from types import SimpleNamespace

from cousins.engine.endpoint import Client, Endpoint, served_models

STEP_WAIT_S = 0.05  # how long one step waits for an answer before handing the feeder back its lock
TOKEN_ID = "token_id:"  # vLLM's spelling of a token with return_tokens_as_token_ids


@dataclass
class Ask:
    """One request's settings: what the actors give vLLM's SamplingParams, for an endpoint."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop: list[str] | None = None
    detokenize: bool = True
    flat_logprobs: bool = False
    ignore_eos: bool = False


def _lp(logprob: float, rank: int) -> SimpleNamespace:
    return SimpleNamespace(logprob=float(logprob), rank=int(rank))


def _token(key: str, tokenizer) -> int | None:
    """A token as the server names it: vLLM's `token_id:N`, else a vocabulary entry, else None."""
    if key.startswith(TOKEN_ID):
        return int(key[len(TOKEN_ID):])
    tid = tokenizer.convert_tokens_to_ids(key) if hasattr(tokenizer, "convert_tokens_to_ids") else None
    return tid if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None) else None


def _position(top: dict | None, own: int | None, own_lp: float | None, tokenizer) -> dict | None:
    """One output position's {token id: logprob, rank} from OpenAI's `top_logprobs` entry, the
    sampled token included (ranked after the top-k when it is not among them)."""
    if top is None:
        return None
    ranked = sorted(((t, lp) for key, lp in top.items() if (t := _token(key, tokenizer)) is not None),
                    key=lambda x: -x[1])
    out = {t: _lp(lp, r) for r, (t, lp) in enumerate(ranked, 1)}
    if own is not None and own not in out and own_lp is not None:
        out[own] = _lp(own_lp, len(ranked) + 1)
    return out


def _prompt_position(entry: dict | None) -> dict | None:
    """One prompt position of vLLM's `prompt_logprobs`: {"id": {logprob, rank, decoded_token}}."""
    if entry is None:
        return None
    return {int(k): _lp(v["logprob"], v.get("rank") or 0) for k, v in entry.items()}


def _read_choice(choice: dict) -> tuple[str, list | None, list | None, list]:
    """(text, tokens, each token's logprob, each position's {token: logprob}) of a completions
    choice, or of a chat one (`message.content`, `logprobs.content[]`)."""
    if "message" in choice:
        content = (choice.get("logprobs") or {}).get("content") or []
        return (choice["message"].get("content") or "", [c["token"] for c in content] or None,
                [c["logprob"] for c in content] or None,
                [{t["token"]: t["logprob"] for t in c.get("top_logprobs") or []} for c in content])
    lp = choice.get("logprobs") or {}
    return choice.get("text") or "", lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs") or []


class _Steps:
    """`llm_engine` of a ServedLLM: a step is whatever has answered by then."""

    def __init__(self, llm: "ServedLLM"):
        self.llm = llm

    def has_unfinished_requests(self) -> bool:
        return bool(self.llm.pending)

    def step(self) -> list:
        pending = self.llm.pending
        if not pending:
            return []
        wait([f for f, *_ in pending.values()], timeout=STEP_WAIT_S, return_when=FIRST_COMPLETED)
        out = []
        for rid in [r for r, (f, *_) in pending.items() if f.done()]:
            future, prompt, ask = pending.pop(rid)
            out.append(self.llm.output(rid, future.result(), prompt, ask))
        return out


class ServedLLM:
    """An endpoint with vLLM's `LLM` surface (see the module docstring)."""

    def __init__(self, ep: Endpoint, tokenizer, *, vllm_server: bool, chat_template_kwargs: dict | None = None):
        self.ep, self.tok, self.vllm_server = ep, tokenizer, vllm_server
        self.template_kwargs = chat_template_kwargs or {}
        self.client = Client(ep)
        self.llm_engine = _Steps(self)
        self.pending: dict[str, tuple] = {}  # request id -> (future reply, prompt ids, Ask)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tok

    def close(self) -> None:
        self.client.close()

    def body(self, prompt: list[int], ask: Ask) -> dict:
        """The /completions request for one prompt (token ids) and its settings."""
        b = {"model": self.ep.model, "max_tokens": ask.max_tokens, "temperature": ask.temperature,
             "top_p": ask.top_p, "logprobs": ask.logprobs or 0}
        if ask.seed is not None:
            b["seed"] = int(ask.seed)
        if ask.stop:
            b["stop"] = list(ask.stop)
        if not self.vllm_server:
            b["prompt"] = self.tok.decode(prompt, skip_special_tokens=False)
            return b
        b.update(prompt=list(prompt), return_tokens_as_token_ids=True)
        if ask.top_k and ask.top_k > 0:
            b["top_k"] = ask.top_k
        if ask.prompt_logprobs is not None:
            b["prompt_logprobs"] = ask.prompt_logprobs
        if ask.ignore_eos:
            b["ignore_eos"] = True
        return b

    def chat_body(self, messages: list[dict], ask: Ask) -> dict:
        """The /chat/completions request (api: chat): the server renders the messages itself."""
        b = {"model": self.ep.model, "messages": messages, "max_tokens": ask.max_tokens,
             "temperature": ask.temperature, "top_p": ask.top_p}
        if ask.logprobs:
            b.update(logprobs=True, top_logprobs=ask.logprobs)
        if ask.seed is not None:
            b["seed"] = int(ask.seed)
        if ask.stop:
            b["stop"] = list(ask.stop)
        if self.vllm_server:
            b["return_tokens_as_token_ids"] = True
            if ask.top_k and ask.top_k > 0:
                b["top_k"] = ask.top_k
            if self.template_kwargs:
                b["chat_template_kwargs"] = self.template_kwargs
        return b

    def enqueue(self, prompts: list[dict], params, use_tqdm: bool = False, lora_request=None) -> list[str]:
        asks = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for p, ask in zip(prompts, asks):
            rid = str(next(self._ids))
            prompt = list(p["prompt_token_ids"])
            if p.get("messages") is not None and ask.prompt_logprobs is None:  # a chat endpoint's generation
                request = self.client.submit("chat/completions", self.chat_body(p["messages"], ask))
            else:
                request = self.client.submit("completions", self.body(prompt, ask))
            self.pending[rid] = (request, prompt, ask)
            ids.append(f"{rid}-served")  # vLLM's "<request id>-<suffix>", as the feeder reads it
        return ids

    def output(self, rid: str, reply, prompt: list[int], ask: Ask) -> SimpleNamespace:
        """vLLM's RequestOutput for one reply; `error` set (and nothing else) when it failed."""
        def failed(reason: str) -> SimpleNamespace:
            return SimpleNamespace(request_id=rid, finished=True, error=reason, prompt_token_ids=prompt,
                                   prompt_logprobs=None, outputs=[SimpleNamespace(
                                       token_ids=[], text="", finish_reason="error", logprobs=None)])

        if reply.error is not None:
            return failed(reply.error)
        try:
            choice = reply.body["choices"][0]
            text, tokens, own, tops = _read_choice(choice)
            if tokens and all(str(t).startswith(TOKEN_ID) for t in tokens):
                ids = [int(str(t)[len(TOKEN_ID):]) for t in tokens]
            else:
                ids = self.tok.encode(text, add_special_tokens=False)
            positions = None
            if ask.logprobs:
                own = own or [None] * len(ids)
                if len(tops) == len(ids):
                    positions = [_position(t, i, o, self.tok) for t, i, o in zip(tops, ids, own)]
                    if any(p is None or i not in p for p, i in zip(positions, ids)):
                        positions = None  # the server's tokens are not the tokenizer's: no top-k
            prompt_lps = None
            if ask.prompt_logprobs is not None:
                raw = choice.get("prompt_logprobs")
                if raw is None:
                    return failed(f"{self.ep.url}: the server returned no prompt_logprobs (teacher-forced "
                                  f"scoring needs a vLLM server)")
                prompt_lps = [_prompt_position(e) for e in raw]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            return failed(f"{self.ep.url}: an answer this client cannot read ({type(e).__name__}: {e}): "
                          f"{str(reply.body)[:200]!r}")
        return SimpleNamespace(
            request_id=rid, finished=True, error=None, prompt_token_ids=prompt, prompt_logprobs=prompt_lps,
            outputs=[SimpleNamespace(token_ids=ids, text=text, logprobs=positions,
                                     finish_reason=choice.get("finish_reason") or "stop")])


class EndpointBackend:
    """The engine actors' way to an endpoint (`EngineSpec.endpoint`): `load` checks the server
    serves the model and returns a ServedLLM with the original's tokenizer (the prompts are
    rendered as for a local engine)."""

    endpoints = True
    lora_request = None

    def load(self, spec) -> ServedLLM:
        from transformers import AutoTokenizer

        from cousins.engine.checkpoints import metadata_dir

        t0 = time.perf_counter()
        ep = spec.endpoint
        owners = served_models(ep)
        tok = AutoTokenizer.from_pretrained(metadata_dir(spec.tokenizer or spec.model_path, spec.revision),
                                            trust_remote_code=spec.trust_remote_code)
        self.load_parts = {"vllm_import_s": 0.0, "fetch_s": 0.0, "engine_init_s": time.perf_counter() - t0,
                           "warm_up_s": 0.0}
        return ServedLLM(ep, tok, vllm_server=owners.get(ep.model) == "vllm",
                         chat_template_kwargs=spec.chat_template_kwargs)

    def params(self, **kwargs) -> Ask:
        return Ask(**kwargs)
