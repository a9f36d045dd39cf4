"""A deterministic fake of the engine backend (cousins.engine.backend.VllmBackend): vLLM's `LLM` surface the
engine actors and the feeder use, on a toy language model, so the actor, feeder and pipeline logic
run in the fast tier without vLLM.

The toy model: a vocabulary of V tokens; the next-token distribution depends only on the model's
path (cousins differ, the noise floor equals the original) and the previous token. Generation takes
one token per request per step (at most max_num_seqs requests at once), is greedy at temperature 0
and otherwise samples with a generator seeded by the request's seed, so a seed gives the same sample
whatever the batch. A prompt containing "FAIL" is refused (ValueError), like a prompt vLLM rejects;
one containing "CRASH" makes the step it is in raise (RuntimeError), like an engine bug, and the
engine is broken from then on.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

V, EOS = 40, 0


@dataclass
class Params:
    temperature: float = 1.0
    max_tokens: int = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    seed: int | None = None
    kw: dict = field(default_factory=dict)


class Tokenizer:
    def __len__(self):
        return V

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=False):
        return [1 + ord(c) % (V - 1) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids if i != EOS)


class _Model:
    def __init__(self, path: str):
        self.salt = hashlib.sha256(path.encode()).digest()
        self.cache: dict[int, list[float]] = {}

    def logprobs(self, prev: int) -> list[float]:
        if prev not in self.cache:
            rng = random.Random(self.salt + bytes([prev % 256]))
            logits = [rng.gauss(0, 2.0) for _ in range(V)]
            logits[EOS] -= 1.5  # answers of a few tokens to a dozen
            z = math.log(sum(math.exp(x) for x in logits))
            self.cache[prev] = [x - z for x in logits]
        return self.cache[prev]


def _ranked(lps: list[float], k: int, extra: int | None = None) -> dict:
    order = sorted(range(V), key=lambda t: (-lps[t], t))
    if k < 0:  # vLLM's -1: the whole vocabulary
        k = V
    keep = order[:k] + ([extra] if extra is not None and extra not in order[:k] else [])
    return {t: SimpleNamespace(logprob=lps[t], rank=order.index(t) + 1) for t in keep}


class _Request:
    def __init__(self, rid, prompt, params, model):
        self.rid, self.prompt, self.p, self.model = rid, list(prompt), params, model
        self.rng = random.Random(params.seed)
        self.tokens, self.logprobs = [], []

    def step(self) -> SimpleNamespace | None:
        p = self.p
        if p.prompt_logprobs is not None:  # teacher-forced scoring: one step, the prompt's distributions
            pl = [None] + [_ranked(self.model.logprobs(a), p.prompt_logprobs, b)
                           for a, b in zip(self.prompt, self.prompt[1:])]
            return self._out("length", prompt_logprobs=pl)
        lps = self.model.logprobs(self.tokens[-1] if self.tokens else self.prompt[-1])
        if p.temperature == 0:
            tok = max(range(V), key=lambda t: (lps[t], -t))
        else:
            tok = self.rng.choices(range(V), weights=[math.exp(x / p.temperature) for x in lps])[0]
        self.tokens.append(tok)
        if p.logprobs:
            self.logprobs.append(_ranked(lps, p.logprobs, tok))
        if tok == EOS or len(self.tokens) >= p.max_tokens:
            return self._out("stop" if tok == EOS else "length")
        return None

    def _out(self, reason, prompt_logprobs=None):
        c = SimpleNamespace(token_ids=self.tokens, text=Tokenizer().decode(self.tokens), finish_reason=reason,
                            logprobs=self.logprobs if self.p.logprobs else None)
        return SimpleNamespace(request_id=self.rid, finished=True, outputs=[c], prompt_token_ids=self.prompt,
                               prompt_logprobs=prompt_logprobs)


CRASH = Tokenizer().encode("CRASH")


def _has(ids: list[int], part: list[int]) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids)))


class _Engine:
    def __init__(self, max_num_seqs):
        self.waiting, self.running, self.max_num_seqs = [], [], max_num_seqs
        self.dead = False

    def has_unfinished_requests(self):
        return bool(self.waiting or self.running)

    def step(self):
        time.sleep(0.001)  # a step takes time, as a real one does: batches meet in the engine
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        if self.dead or any(_has(r.prompt, CRASH) for r in self.running):
            self.dead = True
            raise RuntimeError("the fake engine crashed in a step")
        outs = [(r, r.step()) for r in self.running]
        self.running = [r for r, o in outs if o is None]
        return [o for _, o in outs if o is not None]


class FakeLLM:
    _ids = itertools.count()

    def __init__(self, spec):
        self.model, self.llm_engine, self.tok = _Model(spec.model_path), _Engine(spec.max_num_seqs), Tokenizer()
        self.runner = spec.runner

    def encode(self, prompts, pooling_task=None, use_tqdm=False):
        """A pooling engine's final hidden states: position t's is the one-hot of its token (the toy
        model's next-token distribution depends on that token only; FakeBackend.head maps it)."""
        import torch

        if self.runner != "pooling" or pooling_task != "token_embed":
            raise ValueError("LLM.encode() is only supported for pooling models")
        if self.llm_engine.dead or any(_has(p["prompt_token_ids"], CRASH) for p in prompts):
            self.llm_engine.dead = True
            raise RuntimeError("the fake engine crashed in a step")
        return [SimpleNamespace(outputs=SimpleNamespace(
            data=torch.nn.functional.one_hot(torch.tensor(p["prompt_token_ids"]), V).float())) for p in prompts]

    def get_tokenizer(self):
        return self.tok

    def enqueue(self, prompts, params, use_tqdm=False, lora_request=None):
        params = params if isinstance(params, list) else [params] * len(prompts)
        bad = self.tok.encode("FAIL")
        for p in prompts:  # vLLM adds none of them when it refuses one
            if _has(p["prompt_token_ids"], bad):
                raise ValueError("the fake engine refuses this prompt")
        ids = [str(next(self._ids)) for _ in prompts]
        self.llm_engine.waiting.extend(_Request(i, p["prompt_token_ids"], q, self.model)
                                       for i, p, q in zip(ids, prompts, params))
        return [f"{i}-abcdefgh" for i in ids]


class FakeBackend:
    """`backend=FakeBackend()` for the engine actors and the pipeline's run_generate/run_drift.

    An engine of several GPUs (tensor x pipeline parallel > 1) starts its workers as vLLM's Ray
    executor does: one Ray actor of one GPU (and no CPU) per GPU bundle of the placement group
    the engine actor runs in, and none at all outside one. With `trace_dir`, each engine writes
    where it and its workers landed (node, GPU ids) to a JSON file there."""

    endpoints = True  # a served model's spec too (cousins.engine.backend.backend_for): see load

    def __init__(self, fail_loading: tuple[str, ...] = (), trace_dir: str | None = None):
        self.fail_loading, self.trace_dir = fail_loading, trace_dir
        self.served = False

    def load(self, spec):
        if spec.model_name in self.fail_loading:
            raise OSError(f"no weights at {spec.model_path}")
        if spec.endpoint is not None:  # the product's client to the server (tests/fake_server.py), the toy tokenizer
            from cousins.engine.endpoint import served_models
            from cousins.engine.served import ServedLLM

            self.served = True
            owners = served_models(spec.endpoint)
            return ServedLLM(spec.endpoint, Tokenizer(), vllm_server=owners.get(spec.endpoint.model) == "vllm")
        llm = FakeLLM(spec)
        llm.workers = _start_workers(spec.tensor_parallel_size * spec.pipeline_parallel_size)
        if self.trace_dir:
            import json
            import os
            import uuid

            import ray

            ctx = ray.get_runtime_context()
            trace = {"model": spec.model_name, "pid": os.getpid(), "node": ctx.get_node_id(),
                     "gpus": ray.get_gpu_ids(), "workers": ray.get([w.where.remote() for w in llm.workers], timeout=60)}
            with open(os.path.join(self.trace_dir, f"{uuid.uuid4().hex}.json"), "w") as f:
                json.dump(trace, f)
        return llm

    def head(self, llm, spec):
        """The toy model's head: row t, column `prev` holds log p(t | prev), so a one-hot hidden state
        gives the distribution the engine's prompt logprobs list."""
        import torch

        from cousins.engine.head import Head

        return Head(weight=torch.tensor([[llm.model.logprobs(prev)[t] for prev in range(V)] for t in range(V)],
                                        dtype=torch.float64))

    def params(self, **kw):
        if self.served:
            from cousins.engine.served import Ask

            return Ask(**kw)
        known = {k: kw.pop(k) for k in ("temperature", "max_tokens", "logprobs", "prompt_logprobs", "seed") if k in kw}
        return Params(**known, kw=kw)


def _start_workers(n: int) -> list:
    """vLLM's Ray executor in small: a worker of one GPU per GPU bundle of the current placement group."""
    if n == 1:
        return []
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.get_current_placement_group()
    if group is None:
        raise RuntimeError(f"an engine of {n} GPUs outside a placement group (vLLM would make one of its own)")
    bundles = [i for i, b in enumerate(group.bundle_specs) if b.get("GPU")]
    if len(bundles) < n:
        raise ValueError(f"the placement group holds {len(bundles)} GPU bundles, the engine needs {n}")
    worker = ray.remote(_Worker)
    return [worker.options(num_cpus=0, num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=i)).remote() for i in bundles[:n]]


class _Worker:
    def where(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "gpus": ray.get_gpu_ids()}
