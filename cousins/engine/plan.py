"""From the config to the narrow values the stages take: which models run, how each engine starts,
how rows are sampled, where the engines go. The one place that reads `Config` for the stages.

Every model has its own engine (config.engine_of: the `engine` block with the model's overrides),
and what the block leaves open is read from the model's own config.json: the context from
`max_position_embeddings` (capped at `engine.max_model_len_cap`), a CPU engine's KV cache from the
model's layer and head shapes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cousins.engine import checkpoints
from cousins.contract.config import Config, EndpointConfig, EngineConfig, engine_of
from cousins.engine.backend import GPU_MEMORY_UTILIZATION, EngineSpec, Placement, Sampling
from cousins.engine.endpoint import Endpoint
from cousins.contract.records import NOISE_FLOOR, ModelEntry, SamplingRecord

GIB = 1 << 30
ENDPOINT_CPUS = 0.5  # the most an endpoint's actor holds: it tokenizes and waits on the network
# Each reshuffle of a drift run draws from its own seed, drift.seed plus an offset:
GENERATION_SHUFFLE = 1  # the noise floor's prompt rows, reordered before its generation
SCORE_SHUFFLE = 2  # the original's rows a reordered model scores, reordered before scoring


def shuffle_seed(cfg: Config, offset: int) -> int:
    """The seed of one of a drift run's reshuffles (GENERATION_SHUFFLE, SCORE_SHUFFLE)."""
    return cfg.drift.seed + offset


@dataclass(frozen=True)
class Source:
    """Where a model's files come from and how its prompts are rendered (the original's settings
    for the original and the noise floor; a cousin without a path takes the original's weights)."""

    path: str
    revision: str | None
    tokenizer: str | None
    trust_remote_code: bool
    lora: str | None
    lora_revision: str | None
    lora_mode: str
    prompt_format: str
    chat_template_kwargs: dict = field(default_factory=dict, hash=False)
    thinking_markers: tuple[str, str] | None = None


def source(cfg: Config, name: str) -> Source:
    m = cfg.model
    corpus_kwargs = cfg.corpus.chat_template_kwargs or {}
    if name not in cfg.cousins:  # the original, the noise floor
        return Source(m.path, m.revision, m.tokenizer, m.trust_remote_code, None, None, "merge", m.prompt_format,
                      {**corpus_kwargs, **m.chat_template_kwargs}, _pair(m.thinking_markers))
    c = cfg.cousins[name]
    own = c.path is not None
    return Source(path=c.path if own else m.path, revision=c.revision if own else m.revision,
                  tokenizer=c.tokenizer if own else (c.tokenizer or m.tokenizer),
                  trust_remote_code=c.trust_remote_code or (not own and m.trust_remote_code),
                  lora=c.lora, lora_revision=c.lora_revision, lora_mode=c.lora_mode,
                  prompt_format=c.prompt_format or m.prompt_format,
                  chat_template_kwargs={**corpus_kwargs, **(m.chat_template_kwargs if c.chat_template_kwargs is None
                                                            else c.chat_template_kwargs)},
                  thinking_markers=_pair(c.thinking_markers or (None if own else m.thinking_markers)))


def _pair(markers) -> tuple[str, str] | None:
    return (str(markers[0]), str(markers[1])) if markers else None


def model_entries(cfg: Config, *, noise_floor: bool = False) -> list[ModelEntry]:
    """The original first, then the cousins in config order, then (if asked) the noise floor."""
    m = cfg.model
    out = [ModelEntry(m.name, m.path, m.dtype, m.quantization, "original", revision=m.revision,
                      endpoint=served_as(m.endpoint))]
    for name, c in cfg.cousins.items():
        s = source(cfg, name)
        out.append(ModelEntry(name, s.path, c.dtype or m.dtype, c.quantization, c.kind, c.text_only,
                              revision=s.revision, lora=c.lora, endpoint=served_as(c.endpoint)))
    if noise_floor:
        out.append(ModelEntry(NOISE_FLOOR, m.path, m.dtype, m.quantization, "noise", reorder=True,
                              revision=m.revision, endpoint=served_as(m.endpoint)))
    return out


def served_as(ep: EndpointConfig | None) -> str | None:
    """How the manifest names a model's endpoint (never its key)."""
    if ep is None:
        return None
    how = "; api chat: the server's template renders the prompts" if ep.api == "chat" else ""
    return f"{ep.url} (model {ep.model}{how})"


def endpoint_of(cfg: Config, name: str) -> EndpointConfig | None:
    """The endpoint that runs model `name` (the noise floor's is the original's), or None."""
    return cfg.cousins[name].endpoint if name in cfg.cousins else cfg.model.endpoint


def reordered_batch_size(batch_size: int) -> int:
    """The noise floor's batch size: another batch composition than the original pass's."""
    return max(1, (batch_size * 3) // 4 + 1) if batch_size > 1 else 2


def _dtype_bytes(dtype: str, config: dict) -> int:
    if dtype == "auto":
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return 4 if "32" in dtype else 2


def resolved_engine(cfg: Config, name: str, dtype: str) -> tuple[EngineConfig, int]:
    """Model `name`'s engine block with its context filled in, and its KV cache in bytes: the
    configured `kv_cache_gib`, or room for max_num_seqs sequences of max_model_len from the model's
    shapes, at most `cpu_kv_cache_cap_gib` and at least one sequence (what a CPU engine needs; a GPU
    engine takes it only when kv_cache_gib is set: see engine.llm_kwargs). Reads the model's
    config.json (fetched if the model is remote)."""
    e = engine_of(cfg, name)
    s = source(cfg, name)
    try:
        config = checkpoints.model_config(s.path, s.revision)
    except checkpoints.CheckpointError:
        config = {}  # unreadable here (family.check_models said so before Ray); the caps then decide
    if e.max_model_len is None:
        own = checkpoints.context_length(config)
        e = dataclasses.replace(e, max_model_len=min(own, e.max_model_len_cap) if own else e.max_model_len_cap)
    if e.kv_cache_gib is not None:
        return e, int(e.kv_cache_gib * GIB)
    per_token = checkpoints.kv_bytes_per_token(config, _dtype_bytes(dtype, config))
    cap = int(e.cpu_kv_cache_cap_gib * GIB)
    if per_token is None:
        return e, cap
    # (+ a few blocks: vLLM refuses an engine whose cache cannot hold one max_model_len sequence)
    return e, max(min(per_token * e.max_model_len * e.max_num_seqs, cap), per_token * (e.max_model_len + 256))


def same_as_original(cfg: Config) -> list[str]:
    """The cousins the engine would run exactly as the original (the same checkpoint, revision,
    tokenizer, template, quantization, dtype, no adapter and the same engine block): their drift is the
    engine's own noise. From the config alone: no model file is read."""
    entries = model_entries(cfg)

    def how(e: ModelEntry):
        return (e.path, e.revision, e.dtype, e.quantization, e.lora, e.endpoint, source(cfg, e.name),
                engine_of(cfg, e.name))

    original = how(entries[0])
    return [e.name for e in entries[1:] if not e.text_only and not e.lora and how(e) == original]


def engine_spec(cfg: Config, entry: ModelEntry) -> EngineSpec:
    """How `entry`'s engine starts. Every engine allows its max_logprobs, whatever this run stores."""
    e, kv_bytes = resolved_engine(cfg, entry.name, entry.dtype)
    s = source(cfg, entry.name)
    rank = checkpoints.lora_rank(checkpoints.adapter_config(s.lora, s.lora_revision)) if s.lora else None
    return EngineSpec(
        model_name=entry.name, model_path=entry.path, dtype=entry.dtype, quantization=entry.quantization,
        max_model_len=e.max_model_len, kv_cache_bytes=kv_bytes, kv_cache_set=e.kv_cache_gib is not None,
        tensor_parallel_size=e.tensor_parallel_size, max_num_seqs=e.max_num_seqs,
        enforce_eager=e.enforce_eager, max_logprobs=e.max_logprobs, pipeline_parallel_size=e.pipeline_parallel_size,
        core_process=e.core_process,
        gpu_memory_utilization=GPU_MEMORY_UTILIZATION * min(1.0, e.gpus_per_actor) if e.gpus_per_actor > 0 else None,
        revision=s.revision, tokenizer=s.tokenizer, trust_remote_code=s.trust_remote_code, lora=s.lora,
        lora_revision=s.lora_revision, lora_rank=rank, lora_mode=s.lora_mode, prompt_format=s.prompt_format,
        chat_template_kwargs=dict(s.chat_template_kwargs), thinking_markers=s.thinking_markers,
        choice_target=cfg.corpus.answer.choice_target, endpoint=endpoint(endpoint_of(cfg, entry.name)),
    )


def endpoint(ep: EndpointConfig | None) -> Endpoint | None:
    """The client's view of an endpoint block."""
    if ep is None:
        return None
    return Endpoint(**dataclasses.asdict(ep))  # every key of the block is one of the client's


def placement(cfg: Config, name: str | None = None, *, reorder: bool = False) -> Placement:
    """Where model `name`'s engines go (None: the original's)."""
    e = engine_of(cfg, name or cfg.model.name)
    if endpoint_of(cfg, name or cfg.model.name) is not None:  # an actor that only sends requests
        return Placement(num_actors=e.num_actors, cpus_per_actor=min(e.cpus_per_actor, ENDPOINT_CPUS), gpus_per_actor=0,
                         batch_size=reordered_batch_size(e.batch_size) if reorder else e.batch_size,
                         start_timeout_s=e.start_timeout_s)
    return Placement(num_actors=e.num_actors, cpus_per_actor=e.cpus_per_actor, gpus_per_actor=e.gpus_per_actor,
                     batch_size=reordered_batch_size(e.batch_size) if reorder else e.batch_size,
                     start_timeout_s=e.start_timeout_s, tensor_parallel_size=e.tensor_parallel_size,
                     pipeline_parallel_size=e.pipeline_parallel_size)


def placements(cfg: Config) -> list[tuple[str, Placement]]:
    """Every model's placement (the original's first), to check against the cluster before any stage."""
    return [(n, placement(cfg, n)) for n in [cfg.model.name, *cfg.cousins]]


def sampling(cfg: Config) -> Sampling:
    s = cfg.run.sampling
    return Sampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                    max_tokens=s.max_tokens, logprobs=s.logprobs, stop=tuple(s.stop))


def sampling_record(cfg: Config) -> SamplingRecord:
    s = sampling(cfg)
    return SamplingRecord(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                          logprobs=s.logprobs, stop=list(s.stop))


def head_refusal(cfg: Config, name: str) -> str | None:
    """Why model `name`'s head cannot be applied to its hidden states by us (cousins/engine/head.py),
    from its config.json; None when it can."""
    from cousins.engine.head import head_problem

    s = source(cfg, name)
    try:
        config = checkpoints.model_config(s.path, s.revision)
    except checkpoints.CheckpointError as e:
        return f"its config cannot be read here ({e})"
    return head_problem(config, trust_remote_code=s.trust_remote_code, gguf=checkpoints.is_gguf(s.path),
                        lora_served=bool(s.lora) and s.lora_mode == "serve", path=s.path)


def kld_route(cfg: Config, name: str) -> tuple[str, str | None]:
    """How the exact-KLD pass of compared model `name` (a cousin, the noise floor) gets its
    distributions, and why not by hidden states when it does not (drift.kld_route)."""
    if cfg.drift.kld_route == "lists":
        return "lists", "drift.kld_route=lists"
    original = head_refusal(cfg, cfg.model.name)
    own = head_refusal(cfg, name) if name in cfg.cousins else None
    why = (f"the original's head cannot be applied: {original}" if original else
           f"its head cannot be applied: {own}" if own else None)
    return ("lists", why) if why else ("hidden", None)
