"""The vLLM boundary: the only module that imports vLLM.

An engine is described by an `EngineSpec` (model and engine settings) and rows are sampled by a
`Sampling`; `VllmBackend` turns them into an in-process vLLM `LLM` (warmed up at load) and its
`SamplingParams`. The engine actors (cousins/engine/actors.py) reach vLLM only through such a backend, so
tests can hand them a deterministic fake (tests/fake_engine.py). `python -m cousins.engine.backend JOB.json`
runs bare vLLM on the same prompts and settings, for the benchmark's pipeline-over-bare ratio.

Where vLLM's engine core runs is the spec's `core_process`: in the actor's own process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`) on CPU, where such an engine starts in ~3 s instead of 25-60 s
and keeps one process per actor; in a process of its own (vLLM's default) on GPU, so tokenising,
detokenising, Arrow conversion and the feeder's lock do not share a GIL with the steps that keep
the GPU busy. `engine.core_process` in the config overrides the per-device default.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from cousins.engine.endpoint import Endpoint

ENGINE_ENV = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}
CORE_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # vLLM's switch: its engine core in a process of its own


def core_in_own_process(choice: str, on_cpu: bool | None = None) -> bool:
    """`engine.core_process` (auto, separate, in_actor) on this process's device: auto is a process
    of its own on GPU (vLLM's default) and the engine actor's own process on CPU."""
    if choice != "auto":
        return choice == "separate"
    if on_cpu is None:
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
    return not on_cpu


def set_engine_env(spec: "EngineSpec") -> bool:
    """This process's environment for `spec`'s engine (before vLLM reads it); returns whether the
    engine core runs in a process of its own. The pool's runtime env (its log level) decides first."""
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    own = core_in_own_process(spec.core_process)
    os.environ[CORE_ENV] = "1" if own else "0"
    if own:  # a forked core cannot use CUDA once this process has touched it (a GPU check, an engine before)
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    return own


@dataclass(frozen=True)
class EngineSpec:
    """What an engine actor needs to start: the model and the engine settings (picklable)."""

    model_name: str
    model_path: str
    dtype: str
    quantization: str | None
    max_model_len: int
    kv_cache_bytes: int  # a CPU engine's KV cache; a GPU engine's cap only when kv_cache_set
    tensor_parallel_size: int
    max_num_seqs: int
    enforce_eager: bool
    max_logprobs: int
    pipeline_parallel_size: int = 1
    core_process: str = "auto"  # engine.core_process: auto, separate, in_actor
    # GPU engines: the share of the GPU's memory vLLM may take (and must find free when it starts);
    # below vLLM's 0.9 when engines share a GPU (a fraction of one per actor, two engines in an
    # exact-KLD actor). None: vLLM's default.
    gpu_memory_utilization: float | None = None
    revision: str | None = None  # a hub model's revision
    tokenizer: str | None = None  # the tokenizer's own place (None: the model's)
    trust_remote_code: bool = False
    lora: str | None = None  # a LoRA adapter this engine serves on every request
    lora_revision: str | None = None
    lora_rank: int | None = None  # vLLM's max_lora_rank for it
    lora_mode: str = "merge"  # merge: the adapter merged into the weights on the node; serve: enable_lora
    kv_cache_set: bool = True  # engine.kv_cache_gib was set (else on GPU vLLM's memory share decides)
    prompt_format: str = "chat"  # chat (the chat template) | raw (the messages' text)
    chat_template_kwargs: dict = field(default_factory=dict, hash=False)
    thinking_markers: tuple[str, str] | None = None  # None: from the tokenizer (cousins/engine/thinking.py)
    choice_target: str = "off"  # multiple choice by likelihood: letter | text | off (cousins/engine/choices.py)
    # An OpenAI-compatible server that runs this model (cousins/engine/served.py): no local engine;
    # model_path (or tokenizer) then only gives the tokenizer and chat template the prompts are rendered with.
    endpoint: Endpoint | None = None
    # generate (vLLM's default) | pooling: the engine returns every position's final hidden state
    # (the exact-KLD pass's hidden route: cousins/engine/kld_actor.py, cousins/engine/head.py)
    runner: str = "generate"


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    logprobs: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    """Where a stage's engines run and how rows reach them."""

    num_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    batch_size: int  # rows per batch sent to an engine actor
    start_timeout_s: int = 900  # every actor of the pool must be up before the first batch
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Set by cousins.engine.placement for engines of several GPUs: each actor's placement group.
    remote_args_fn: Callable[[], dict] | None = field(default=None, compare=False, repr=False)


GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of a whole GPU
CPU_TOKEN_BUDGET = 4096  # vLLM's own default per step on CPU; raised to max_model_len when that is longer


def llm_kwargs(spec: EngineSpec, on_cpu: bool | None = None) -> dict:
    """vLLM `LLM(...)` arguments for an engine of `spec` (the actors' and the bare benchmark's).

    On CPU, chunked prefill is off and a step's token budget holds the longest prompt: a seeded
    request whose prefill is split over steps makes vLLM rewind its sampler's generator, which a
    CPU generator cannot do (`RuntimeError: CPU Generator does not use offset`, the whole batch
    lost). Unchunked, a prompt waits until a step has room for all of it."""
    if on_cpu is None:
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
    unchunked = dict(enable_chunked_prefill=False,
                     max_num_batched_tokens=max(spec.max_model_len, CPU_TOKEN_BUDGET)) if on_cpu else {}
    lora = dict(enable_lora=True, max_loras=1, max_lora_rank=spec.lora_rank or 16) if spec.lora else {}
    return dict(model=spec.model_path, tokenizer=spec.tokenizer or spec.model_path, dtype=spec.dtype,
                quantization=spec.quantization, max_model_len=spec.max_model_len,
                trust_remote_code=spec.trust_remote_code, **lora,
                **({"kv_cache_memory_bytes": spec.kv_cache_bytes} if on_cpu or spec.kv_cache_set else {}),
                tensor_parallel_size=spec.tensor_parallel_size, pipeline_parallel_size=spec.pipeline_parallel_size,
                # One GPU: vLLM's worker in the engine's process. Several: vLLM's Ray executor, one
                # worker per bundle of the placement group the actor runs in (cousins.engine.placement).
                distributed_executor_backend="uni" if spec.tensor_parallel_size * spec.pipeline_parallel_size == 1
                else "ray",
                max_num_seqs=spec.max_num_seqs, enforce_eager=spec.enforce_eager, max_logprobs=spec.max_logprobs,
                logprobs_mode="raw_logprobs", seed=0, **unchunked,
                **({"gpu_memory_utilization": spec.gpu_memory_utilization}
                   if spec.gpu_memory_utilization is not None and not on_cpu else {}),
                **(POOLING if spec.runner == "pooling" else {}))


# The hidden route's engine: every position's final hidden state (after the model's last norm), as
# is: no pooling, no activation or normalisation; no prefix cache (a cached prefix is not recomputed,
# so it would have no hidden states to return).
POOLING = dict(runner="pooling", enable_prefix_caching=False,
               pooler_config={"task": "token_embed", "pooling_type": "ALL", "use_activation": False})


def sampling_kwargs(s: Sampling, seed: int, detokenize: bool) -> dict:
    """vLLM `SamplingParams(...)` arguments for one row of a generation stage."""
    return dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
                max_tokens=s.max_tokens, logprobs=s.logprobs if s.logprobs > 0 else None, seed=int(seed),
                stop=list(s.stop) or None, detokenize=detokenize, flat_logprobs=True)


def local_spec(spec: EngineSpec) -> EngineSpec:
    """`spec` with its model, tokenizer and adapter as local paths on this node (a hub model or a
    stored one fetched into this node's cache: cousins.engine.checkpoints), as vLLM loads them."""
    import dataclasses

    from cousins.engine.checkpoints import local_copy, merged_lora

    model = local_copy(spec.model_path, revision=spec.revision)
    lora = local_copy(spec.lora, revision=spec.lora_revision) if spec.lora else None
    tokenizer = local_copy(spec.tokenizer) if spec.tokenizer else None
    if lora and spec.lora_mode == "merge":
        model, lora, tokenizer = merged_lora(model, lora), None, tokenizer or model
    return dataclasses.replace(spec, model_path=model, tokenizer=tokenizer, revision=None, lora=lora,
                               lora_revision=None)


def backend_for(spec: EngineSpec, given=None):
    """The backend an actor of `spec` uses: `given` (a test's fake) where it serves such a spec
    (`endpoints`: it takes served models too), else the endpoint's for a served model, vLLM's for
    the others."""
    if spec.endpoint is not None and not getattr(given, "endpoints", False):
        from cousins.engine.served import EndpointBackend

        return EndpointBackend()
    return given or VllmBackend()


class VllmBackend:
    """The engine actors' way to vLLM: an in-process `LLM`, warmed up, and its `SamplingParams`."""

    def __init__(self):
        self.adapters: dict[str, str] = {}  # model name -> its LoRA adapter's local path

    def prepare(self, spec: EngineSpec) -> None:
        """The engine's environment set and vLLM imported (an engine host does it ahead of its
        pass: cousins/engine/hosts.py)."""
        set_engine_env(spec)
        import vllm  # noqa: F401 - the import is the point (seconds of Python)

        from cousins.engine.vllm_fixes import apply

        apply()  # vLLM runs it too, as a plugin, where cousins is installed (not from a bare checkout)

    def load(self, spec: EngineSpec):
        """The warmed-up engine; `load_parts` then holds what each part of its start took (s):
        vLLM's import, fetching the model to the node (0 when local or cached), the engine's
        construction (weights loaded, KV cache allocated) and the warm-up call."""
        import time

        t0 = time.perf_counter()
        self.prepare(spec)
        from vllm import LLM

        t1 = time.perf_counter()
        spec = local_spec(spec)
        t2 = time.perf_counter()
        llm = LLM(**llm_kwargs(spec))
        t3 = time.perf_counter()
        if spec.lora:
            self.adapters[spec.model_name] = spec.lora
        _warm_up(llm, spec, self.lora_request(spec))
        self.load_parts = {"vllm_import_s": t1 - t0, "fetch_s": t2 - t1, "engine_init_s": t3 - t2,
                           "warm_up_s": time.perf_counter() - t3}
        return llm

    def lora_request(self, spec: EngineSpec):
        """The adapter request every call of `spec`'s engine carries (None without an adapter)."""
        path = self.adapters.get(spec.model_name) if spec.lora else None
        if path is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=spec.model_name, lora_int_id=1, lora_path=path)

    def params(self, **kwargs):
        from vllm import SamplingParams

        return SamplingParams(**kwargs)

    def head(self, llm, spec: EngineSpec):
        """The output head of a pooling engine's model, ready to apply to its hidden states
        (cousins/engine/head.py), on this process's GPU if it has one, in the engine's dtype."""
        import torch

        from cousins.engine.checkpoints import model_config
        from cousins.engine.head import load_head

        mc = llm.llm_engine.model_config
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return load_head(mc.model, model_config(mc.model), mc.dtype, device)


def hidden_states(llm, prompts: list) -> list:
    """Every position's final hidden state of each prompt (a pooling engine: spec.runner), as
    (positions, hidden) tensors on the host."""
    return [o.outputs.data for o in llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)]


def _warm_up(llm, spec: EngineSpec, lora=None) -> None:
    """One small call through everything a batch uses (sampling, top-k logprobs, prompt logprobs,
    several sequence lengths): the engine's first call pays one-off costs (≈3 s for the tiny
    model on CPU, a 96-row batch running at half speed) that belong to start-up, not to the
    first batch of rows."""
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    base = tok.encode("warm up the engine " * 8, add_special_tokens=False) or [0]
    longest = max(1, min(len(base), spec.max_model_len // 2 - 8))
    prompts = [{"prompt_token_ids": base[:max(1, longest * (i + 1) // 8)]} for i in range(8)]
    if spec.runner == "pooling":
        hidden_states(llm, prompts)
        return
    k = max(1, spec.max_logprobs)
    # (no prompt logprobs through a served adapter: vLLM's LoRA logits fail on a batch of them)
    llm.generate(prompts, SamplingParams(max_tokens=8, logprobs=k, prompt_logprobs=None if lora else k,
                                         ignore_eos=True, seed=0), use_tqdm=False, lora_request=lora)


# --- bare vLLM, for the benchmark ------------------------------------------------------------------

def bare_job(spec: EngineSpec, sampling: Sampling, messages: list[list[dict]], seeds: list[int]) -> dict:
    """The JSON a bare run (`python -m cousins.engine.backend JOB.json`) reads."""
    return {"spec": asdict(spec), "sampling": asdict(sampling), "messages": messages, "seeds": seeds}


def _bare_main(path: str) -> None:
    """vLLM's LLM alone in this process: a warm-up call, then one timed `generate` of every prompt,
    as the engine actors run it (no engine detokenizing without stop strings, texts decoded once
    per output, in the timing); then vLLM's defaults (detokenize=True) for the record."""
    import json

    t0 = time.perf_counter()
    with open(path) as f:
        job = json.load(f)
    spec = EngineSpec(**job["spec"])
    sampling = Sampling(**{**job["sampling"], "stop": tuple(job["sampling"]["stop"])})
    own_process = set_engine_env(spec)
    from vllm import LLM, SamplingParams

    imported = time.perf_counter()
    llm = LLM(**llm_kwargs(spec))
    loaded = time.perf_counter()
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                                               add_special_tokens=False)} for m in job["messages"]]
    detok = bool(sampling.stop)
    params = [SamplingParams(**sampling_kwargs(sampling, s, detok)) for s in job["seeds"]]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up
    g0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    texts = [o.outputs[0].text if detok else tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)
             for o in outs]
    gen = time.perf_counter() - g0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    g1 = time.perf_counter()
    default = llm.generate(prompts, [SamplingParams(**{**sampling_kwargs(sampling, s, True), "flat_logprobs": False})
                                     for s in job["seeds"]], use_tqdm=False)
    gen_default = time.perf_counter() - g1
    default_tokens = sum(len(o.outputs[0].token_ids) for o in default)
    print(json.dumps({"core_in_own_process": own_process, "import_s": imported - t0, "load_s": loaded - imported,
                      "generate_s": gen,
                      "output_tokens": tokens, "rows": len(prompts), "tokens_per_s": tokens / gen,
                      "default_detokenize_s": gen_default,
                      "default_texts_equal": [o.outputs[0].text for o in default] == texts,
                      "default_detokenize_tokens_per_s": default_tokens / gen_default}))


if __name__ == "__main__":
    import sys

    _bare_main(sys.argv[1])
