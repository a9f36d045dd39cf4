"""The config's validation: every problem of a typed Config found and reported at once, before Ray starts.

`validate` checks a Config as `config.to_config` makes it (the jobs first make its local paths
absolute with `config.resolve_paths`): names against the one name rule, dtypes, prompt formats and build recipes, that local models and the
corpus exist (reading the local filesystem only; hub and stored models are checked by
cousins.family.prepare.check_models), the sampling ranges, every engine block (the shared one and
each model's overrides on top of it), the drift settings and every cousin, the cost and the storage
URL's filesystem. It raises one ConfigError listing them all, or returns nothing.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from cousins.contract.config import (ROW_CHECKERS, CORE_PROCESS, COUSIN_KINDS, DTYPES, ENDPOINT_APIS, ENGINE_KEYS,
                                     LORA_MODES, MAX_LOGPROBS, PROMPT_FORMATS, Config, ConfigError, EngineConfig, engine_of)
from cousins.contract.names import NAME_RULE, is_name
from cousins.contract.recipes import COUSIN_RECIPES, MODEL_RECIPES
from cousins.contract.records import NOISE_FLOOR


def _model_refs(cfg: Config) -> list[tuple[str, str | None, str | None]]:
    """(where in the config, the checkpoint reference, its build recipe) of every model."""
    out = [("model", cfg.model.path, cfg.model.build)]
    for name, c in cfg.cousins.items():
        if c.path is not None:
            out.append((f"cousins.{name}", c.path, c.build))
    return out


def validate(cfg: Config) -> None:
    """Every problem in one ConfigError, or nothing. Reads the local filesystem, starts nothing
    (models on the hub or the storage are checked by cousins.family.prepare.check_models, before Ray too)."""
    from cousins.contract.refs import is_gguf, kind

    problems: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    m = cfg.model
    check(is_name(m.name), f"model.name {m.name!r}: use {NAME_RULE}")
    check(m.dtype in DTYPES, f"model.dtype {m.dtype!r} must be one of {list(DTYPES)}")
    check(m.build is None or m.build in MODEL_RECIPES,
          f"model.build {m.build!r} is not a known recipe; known: {list(MODEL_RECIPES)}")
    check(m.prompt_format in PROMPT_FORMATS, f"model.prompt_format {m.prompt_format!r} must be one of "
          f"{list(PROMPT_FORMATS)}")
    for where, ref, build in _model_refs(cfg):
        if build is not None or kind(ref, build=build) != "local":
            continue
        if is_gguf(ref):
            check(os.path.isfile(ref), f"{where}.path: GGUF file not found: {ref!r}")
            continue
        if not os.path.exists(os.path.join(ref, "config.json")):
            hint = (" (build it with `cousins models build`, or set model.path)" if where == "model"
                    else " (set its path or build)")
            problems.append(f"{where}: model directory not found: {ref!r} has no config.json{hint}; "
                            f"a hub model is named owner/name (hf://owner/name), a stored one by its URL")
    for where, ref, build in _model_refs(cfg):
        tokenizer = (m if where == "model" else cfg.cousins[where.split(".", 1)[1]]).tokenizer
        check(not is_gguf(ref) or tokenizer is not None,
              f"{where}: a GGUF file needs its tokenizer named: set {where}.tokenizer to the original "
              f"checkpoint's directory or hub id (vLLM's GGUF tokenizer conversion is slow and unreliable)")

    c = cfg.corpus
    check(c.format in ("auto", "jsonl", "parquet", "csv"),
          f"corpus.format {c.format!r} must be one of auto, jsonl, parquet, csv")
    check(c.limit is None or c.limit >= 1, f"corpus.limit must be >= 1 or null, got {c.limit}")
    check(c.max_chars >= 1, f"corpus.max_chars must be >= 1, got {c.max_chars}")
    check(cfg.storage.rows_per_file >= 1, f"storage.rows_per_file must be >= 1, got {cfg.storage.rows_per_file}")
    check(cfg.log.progress_s > 0, f"log.progress_s must be > 0, got {cfg.log.progress_s}")
    if "://" not in c.path and not any(ch in c.path for ch in "*?[") and not os.path.exists(c.path):
        problems.append(f"corpus not found: {c.path!r} does not exist (set corpus.path)")
    check(bool(c.fields.prompt) or bool(c.fields.messages),
          "corpus.fields: set at least one of prompt and messages")
    _check_answer(c.answer, cfg.drift.answer_match, check)
    for where, pair in [("model", m.thinking_markers), *[(f"cousins.{n}", x.thinking_markers)
                                                         for n, x in cfg.cousins.items()]]:
        check(pair is None or (len(pair) == 2 and all(isinstance(x, str) and x for x in pair) and pair[0] != pair[1]),
              f"{where}.thinking_markers must be null or two different non-empty strings [opening, closing], "
              f"got {pair}")

    r, s = cfg.run, cfg.run.sampling
    check(r.samples >= 1, f"run.samples must be >= 1, got {r.samples}")
    check(r.run_id is None or is_name(r.run_id), f"run.run_id {r.run_id!r}: use {NAME_RULE}")
    check(s.temperature >= 0, f"run.sampling.temperature must be >= 0, got {s.temperature}")
    check(0 < s.top_p <= 1, f"run.sampling.top_p must be in (0, 1], got {s.top_p}")
    check(s.top_k >= 0, f"run.sampling.top_k must be >= 0 (0 = off), got {s.top_k}")
    check(s.max_tokens >= 1, f"run.sampling.max_tokens must be >= 1, got {s.max_tokens}")
    check(0 <= s.logprobs <= MAX_LOGPROBS, f"run.sampling.logprobs must be in [0, {MAX_LOGPROBS}], got {s.logprobs}")

    _check_engine(cfg.engine, "engine", check)
    check(cfg.engine.max_parallel_models is None or cfg.engine.max_parallel_models >= 1,
          f"engine.max_parallel_models must be >= 1 or null, got {cfg.engine.max_parallel_models}")
    for name, own in [(m.name, m.engine), *[(n, c.engine) for n, c in cfg.cousins.items()]]:
        if not own:
            continue
        where = "model.engine" if name == m.name else f"cousins.{name}.engine"
        unknown = sorted(set(own) - set(ENGINE_KEYS))
        if unknown:
            problems.append(f"{where}: unknown key(s) {unknown}; known: {list(ENGINE_KEYS)}")
            continue
        try:
            OmegaConf.merge(OmegaConf.structured(cfg.engine), own)
        except Exception as e:  # noqa: BLE001 - a value of the wrong type, reported with the others
            problems.append(f"{where}: {str(e).splitlines()[0]}")
            continue
        _check_engine(engine_of(cfg, name), where, check)

    _validate_cousins(cfg, check)
    for where, ep in [("model.endpoint", m.endpoint), *[(f"cousins.{n}.endpoint", c.endpoint)
                                                       for n, c in cfg.cousins.items()]]:
        if ep is not None:
            _check_endpoint(ep, where, check)
    served = [n for n, c in cfg.cousins.items() if c.endpoint is not None] + ([m.name] if m.endpoint else [])
    check(not served or cfg.drift.kld != "exact", f"drift.kld=exact needs every position's whole distribution, "
          f"which an endpoint does not give: {', '.join(map(repr, served))} run on one; use drift.kld=topk")
    for name, c in cfg.cousins.items():
        local = [k for k in ("quantization", "lora", "build", "distill_from", "dtype") if getattr(c, k) is not None]
        check(c.endpoint is None or not local, f"cousins.{name}: {', '.join(local)} describe a model run by an "
              f"engine of ours; with an endpoint the server decides what runs (drop them, or the endpoint)")
    price = cfg.cost.price_per_accelerator_hour
    check(price is None or price >= 0, f"cost.price_per_accelerator_hour must be >= 0 or null, got {price}")

    try:
        import fsspec

        fsspec.get_filesystem_class(cfg.storage.root.split("://", 1)[0] if "://" in cfg.storage.root else "file")
    except (ImportError, ValueError) as err:
        problems.append(f"storage.root {cfg.storage.root!r}: {err}")

    if problems:
        raise ConfigError(problems)


def _check_answer(a, answer_match: str, check) -> None:
    """corpus.answer: known checker names; a `regex` anywhere needs a pattern that compiles."""
    import re

    named = {"corpus.answer.checker": a.checker, **{f"corpus.answer.by_category.{k}": v
                                                    for k, v in a.by_category.items()}}
    for where, name in named.items():
        check(name is None or name in ROW_CHECKERS, f"{where} {name!r} must be one of {', '.join(ROW_CHECKERS)}")
    check(a.which in ("first", "last"), f"corpus.answer.which {a.which!r} must be first or last")
    check(a.choice_target in ("letter", "text", "off"),
          f"corpus.answer.choice_target {a.choice_target!r} must be letter, text or off")
    check(a.group >= 0, f"corpus.answer.group must be >= 0, got {a.group}")
    if a.pattern is not None:
        try:
            n = re.compile(a.pattern).groups
            check(a.group <= n, f"corpus.answer.group {a.group} but corpus.answer.pattern has {n} group(s)")
        except re.error as e:
            check(False, f"corpus.answer.pattern does not compile: {e}")
    elif "regex" in (answer_match, *named.values()):
        check(False, "the regex answer checker needs corpus.answer.pattern")


def _check_endpoint(ep, where: str, check) -> None:
    """One model's endpoint block (the server itself is asked by check_models, before Ray)."""
    import re

    check(ep.url.startswith(("http://", "https://")), f"{where}.url {ep.url!r} must start with http:// or https://")
    check(bool(ep.model), f"{where}.model: name the model as the server serves it (its /v1/models id)")
    check(ep.api in ENDPOINT_APIS, f"{where}.api {ep.api!r} must be one of {', '.join(ENDPOINT_APIS)}")
    check(ep.api_key_env is None or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", ep.api_key_env) is not None,
          f"{where}.api_key_env {ep.api_key_env!r}: name the environment variable that holds the key, not the key")
    check(ep.max_concurrency >= 1, f"{where}.max_concurrency must be >= 1, got {ep.max_concurrency}")
    check(ep.requests_per_s is None or ep.requests_per_s > 0,
          f"{where}.requests_per_s must be > 0 or null, got {ep.requests_per_s}")
    check(ep.timeout_s > 0, f"{where}.timeout_s must be > 0, got {ep.timeout_s}")
    check(ep.retries >= 0, f"{where}.retries must be >= 0, got {ep.retries}")


def _check_engine(e: EngineConfig, where: str, check) -> None:
    """The checks of one engine block (the shared one, or a model's with its overrides)."""
    check(e.max_model_len is None or e.max_model_len >= 16, f"{where}.max_model_len must be >= 16, got {e.max_model_len}")
    check(e.max_model_len_cap >= 16, f"{where}.max_model_len_cap must be >= 16, got {e.max_model_len_cap}")
    check(e.kv_cache_gib is None or e.kv_cache_gib > 0, f"{where}.kv_cache_gib must be > 0 or null, got {e.kv_cache_gib}")
    check(e.cpu_kv_cache_cap_gib > 0, f"{where}.cpu_kv_cache_cap_gib must be > 0, got {e.cpu_kv_cache_cap_gib}")
    check(1 <= e.max_logprobs, f"{where}.max_logprobs must be >= 1, got {e.max_logprobs}")
    check(e.tensor_parallel_size >= 1, f"{where}.tensor_parallel_size must be >= 1, got {e.tensor_parallel_size}")
    check(e.gpus_per_actor >= 0, f"{where}.gpus_per_actor must be >= 0, got {e.gpus_per_actor}")
    check(e.pipeline_parallel_size >= 1, f"{where}.pipeline_parallel_size must be >= 1, got {e.pipeline_parallel_size}")
    workers = e.tensor_parallel_size * e.pipeline_parallel_size
    check(e.gpus_per_actor <= 1, f"{where}.gpus_per_actor must be <= 1, got {e.gpus_per_actor}: an engine of "
          f"several GPUs is {where}.tensor_parallel_size (and pipeline_parallel_size) workers of one GPU each")
    check(e.gpus_per_actor == 0 or workers == 1 or e.gpus_per_actor == 1,
          f"{where}.gpus_per_actor must be 1 (one GPU per worker) when tensor_parallel_size x pipeline_parallel_size "
          f"> 1, got {e.gpus_per_actor}")
    check(e.gpus_per_actor > 0 or workers == 1,
          f"{where}.tensor_parallel_size / pipeline_parallel_size > 1 need GPUs ({where}.gpus_per_actor=1)")
    check(e.core_process in CORE_PROCESS, f"{where}.core_process must be one of {', '.join(CORE_PROCESS)}, "
          f"got {e.core_process!r}")
    check(e.cpus_per_actor >= 0, f"{where}.cpus_per_actor must be >= 0, got {e.cpus_per_actor}")
    check(e.num_actors >= 1, f"{where}.num_actors must be >= 1, got {e.num_actors}")
    check(e.batch_size >= 1, f"{where}.batch_size must be >= 1, got {e.batch_size}")
    check(e.max_num_seqs >= 1, f"{where}.max_num_seqs must be >= 1, got {e.max_num_seqs}")
    check(e.start_timeout_s >= 1, f"{where}.start_timeout_s must be >= 1, got {e.start_timeout_s}")


def _validate_cousins(cfg: Config, check) -> None:
    d = cfg.drift
    check(1 <= d.score_topk <= MAX_LOGPROBS, f"drift.score_topk must be in [1, {MAX_LOGPROBS}], got {d.score_topk}")
    check(d.kld in ("topk", "exact"), f"drift.kld {d.kld!r} must be topk or exact")
    check(d.kld_route in ("auto", "hidden", "lists"), f"drift.kld_route {d.kld_route!r} must be auto, hidden or lists")
    if d.kld == "exact":
        for name in [cfg.model.name, *cfg.cousins]:
            e = engine_of(cfg, name)
            where = "engine" if not (cfg.model.engine if name == cfg.model.name else cfg.cousins[name].engine) \
                else ("model.engine" if name == cfg.model.name else f"cousins.{name}.engine")
            check(e.tensor_parallel_size * e.pipeline_parallel_size == 1,
                  f"drift.kld=exact holds two engines in one actor: {name!r} needs an engine of one GPU (or a CPU "
                  f"engine), not {where}.tensor_parallel_size/pipeline_parallel_size > 1")
    check(d.answer_match in ROW_CHECKERS,
          f"drift.answer_match {d.answer_match!r} must be one of {', '.join(ROW_CHECKERS)}")
    check(d.bootstrap >= 10, f"drift.bootstrap must be >= 10 resamples, got {d.bootstrap}")
    check(0.5 <= d.confidence < 1, f"drift.confidence must be in [0.5, 1), got {d.confidence}")
    check(d.worst_n >= 0, f"drift.worst_n must be >= 0, got {d.worst_n}")
    check(d.distill_samples >= 1, f"drift.distill_samples must be >= 1, got {d.distill_samples}")
    for name, c in cfg.cousins.items():
        where = f"cousins.{name}"
        check(is_name(name), f"{where}: the name {name!r}: use {NAME_RULE}")
        check(name not in (cfg.model.name, NOISE_FLOOR),
              f"{where}: the name is taken (the original is {cfg.model.name!r}; {NOISE_FLOOR!r} is reserved)")
        check(c.kind in COUSIN_KINDS, f"{where}.kind {c.kind!r} must be one of {list(COUSIN_KINDS)}")
        check(c.dtype is None or c.dtype in DTYPES, f"{where}.dtype {c.dtype!r} must be one of {list(DTYPES)}")
        check(c.build is None or c.build in COUSIN_RECIPES,
              f"{where}.build {c.build!r} is not a known recipe; known: {list(COUSIN_RECIPES)}")
        check(c.build is None or c.path is not None, f"{where}: build={c.build} needs a path to build into")
        prompted_otherwise = ((c.chat_template_kwargs is not None and c.chat_template_kwargs != cfg.model.chat_template_kwargs)
                              or c.prompt_format not in (None, cfg.model.prompt_format))
        check(c.path is not None or c.endpoint is not None or c.quantization is not None or c.lora is not None
              or c.dtype not in (None, cfg.model.dtype) or prompted_otherwise,
              f"{where}: without a path it is the original's weights; set quantization, lora, another dtype, or "
              f"other chat_template_kwargs (e.g. {{enable_thinking: false}}: the same weights, thinking off)")
        check(c.distill_mode in ("sft", "kd"), f"{where}.distill_mode {c.distill_mode!r} must be sft or kd")
        check(c.prompt_format is None or c.prompt_format in PROMPT_FORMATS,
              f"{where}.prompt_format {c.prompt_format!r} must be one of {list(PROMPT_FORMATS)} (or null: the original's)")
        check(c.lora is None or c.build is None, f"{where}: a lora cousin is not built (drop build or lora)")
        check(c.lora_mode in LORA_MODES, f"{where}.lora_mode {c.lora_mode!r} must be one of {list(LORA_MODES)}")
