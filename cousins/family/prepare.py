"""The original and its cousins as a run needs them: built where absent, vocabularies checked.

- Quantized cousins with a `build` recipe are made from the original's weights before Ray starts
  (cousins/family/quantize.py).
- Distilled cousins (`build: tiny-student`) learn from the original's generations in a committed
  run: `distill_from`, or a teacher-data run the drift job commits first on `drift.distill_corpus`
  (run id `{run_id}.teacher-data`; a rerun finds it committed and reuses it).
- Token-level metrics compare distributions token by token, so every cousin that is not
  `text_only` must share the original's vocabulary: checked once, every mismatch reported at once.
"""

from __future__ import annotations

import copy
import dataclasses
import os

from cousins.engine import checkpoints
from cousins.engine import plan
from cousins.contract import refs
from cousins.contract.config import Config, ConfigError, SamplingConfig
from cousins.contract.recipes import QUANT_RECIPES, REALISTIC_STUDENT, TINY_STUDENT


def build_quantized_cousins(cfg: Config) -> list[str]:
    """Build every absent quantized cousin from the original, and every realistic student (taught
    the lessons, not a run: it needs no cluster); the names built."""
    from cousins.family import quantize
    from cousins.family import realistic

    built = []
    for name, c in cfg.cousins.items():
        if c.build == REALISTIC_STUDENT:  # (check_build_targets vouched for its path)
            if realistic.ensure_student(c.path, original_dir(cfg), cfg.model.seed):
                built.append(name)
            continue
        if c.build not in QUANT_RECIPES:
            continue
        src = original_dir(cfg)  # a hub or stored original is fetched whole here: the build reads its weights
        if not quantize.is_current(c.path, src, c.build):
            print(f"building cousin {name!r}: {c.build} of {cfg.model.path} -> {c.path}", flush=True)
            quantize.build_quantized(src, c.path, c.build, setting=f"cousins.{name}.path")
            built.append(name)
    return built


def original_dir(cfg: Config) -> str:
    """A local directory of the original's files, for builds that read its weights on the driver."""
    return checkpoints.local_copy(cfg.model.path, revision=cfg.model.revision, options=cfg.storage.options)


def check_build_targets(cfg: Config) -> None:
    """ConfigError naming every model whose build would replace a directory the project did not
    build (a user's checkpoint named as the path of a model with a `build` recipe): before any build."""
    from cousins.family.models import check_ours
    from cousins.run.removal import NotOurs

    problems = []
    targets = [("model.path", cfg.model.path, cfg.model.build)]
    targets += [(f"cousins.{n}.path", c.path, c.build) for n, c in cfg.cousins.items()]
    for setting, path, build in targets:
        if build is None or path is None:
            continue
        try:
            check_ours(path, setting=setting)
        except NotOurs as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems)


def _tokenizer_dir(cfg: Config, name: str) -> str | None:
    """A local directory with model `name`'s tokenizer files (fetched if remote); None if it has none yet."""
    s = plan.source(cfg, name)
    ref, revision = (s.tokenizer, None) if s.tokenizer else (s.path, s.revision)
    if refs.kind(ref) == "local" and not os.path.exists(os.path.join(ref, "config.json")) \
            and not os.path.exists(os.path.join(ref, "tokenizer_config.json")):
        return None  # built later (a student trained after the teacher data run)
    return checkpoints.metadata_dir(ref, revision)


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _vocab(path: str | None) -> dict[str, int] | None:
    return None if path is None else _tokenizer(path).get_vocab()


def check_vocabularies(cfg: Config) -> None:
    """ConfigError naming every token-level cousin whose tokenizer differs from the original's."""
    original = _vocab(_tokenizer_dir(cfg, cfg.model.name))
    if original is None:
        return
    problems = []
    rebuilt = set(students_to_build(cfg))  # a student of an older build is trained again, on this tokenizer
    for name, c in cfg.cousins.items():
        if c.text_only or (c.path is None and c.tokenizer is None) or name in rebuilt:
            continue
        vocab = _vocab(_tokenizer_dir(cfg, name))
        if vocab is not None and vocab != original:
            only = len(set(vocab.items()) ^ set(original.items()))
            problems.append(
                f"cousins.{name}: its tokenizer ({c.tokenizer or c.path}, {len(vocab)} tokens) differs from the "
                f"original {cfg.model.name!r}'s ({cfg.model.tokenizer or cfg.model.path}, {len(original)} tokens; "
                f"{only} entries differ). Token-level drift needs a shared vocabulary; set cousins.{name}.text_only=true "
                f"to compare texts only")
    if problems:
        raise ConfigError(problems)


def _where(cfg: Config, name: str) -> str:
    return "model" if name == cfg.model.name else f"cousins.{name}"


def check_models(cfg: Config, *, scoring: bool = False) -> None:
    """Everything about each model that can be known before Ray, every problem reported at once:
    its files can be had (a hub id or a stored URL: its small files are fetched), its engine
    settings fit it (context, logprobs, the KV cache, a format the engine's device runs, a LoRA
    adapter), and the prompts it is scored on are the ones it sees (check_templates). `scoring`: a
    drift run, whose token-level cousins are teacher-forced."""
    from cousins.engine.formats import cpu_refusal

    problems = []
    s = cfg.run.sampling
    for name in [cfg.model.name, *cfg.cousins]:
        where, src = _where(cfg, name), plan.source(cfg, name)
        entry = next(e for e in plan.model_entries(cfg) if e.name == name)
        c = cfg.cousins.get(name)
        if c is not None and c.build is not None and not os.path.exists(os.path.join(c.path, "config.json")):
            continue  # built later (a student): checked by its engine's start
        try:
            config = checkpoints.model_config(src.path, src.revision)
            if src.tokenizer:
                checkpoints.metadata_dir(src.tokenizer)
            e, _ = plan.resolved_engine(cfg, name, entry.dtype)
            rank = checkpoints.lora_rank(checkpoints.adapter_config(src.lora, src.lora_revision)) if src.lora else None
        except checkpoints.CheckpointError as err:
            problems.append(f"{where}: {err}")
            continue
        key = f"{where}.engine" if (cfg.model.engine if c is None else c.engine) else "engine"
        ep = plan.endpoint_of(cfg, name)
        if ep is not None:
            problems += _endpoint_problems(cfg, name, where, ep, scoring)
            continue
        own = checkpoints.context_length(config)
        if own and e.max_model_len > own:
            problems.append(f"{where}: {key}.max_model_len={e.max_model_len} is beyond the model's own context "
                            f"({own}, config.json); vLLM refuses it. Lower it or leave it null (the model's own, capped "
                            f"at {key}.max_model_len_cap)")
        if s.max_tokens >= e.max_model_len:
            problems.append(f"{where}: run.sampling.max_tokens ({s.max_tokens}) must be below its max_model_len "
                            f"({e.max_model_len}): raise {key}.max_model_len or lower max_tokens")
        need = max(s.logprobs, cfg.drift.score_topk if cfg.cousins else 0)
        if need > e.max_logprobs:
            problems.append(f"{where}: {key}.max_logprobs={e.max_logprobs} is below the {need} logprobs a position "
                            f"asks for (run.sampling.logprobs, drift.score_topk)")
        if e.gpus_per_actor == 0:
            if refs.is_gguf(src.path):
                problems.append(f"{where}: {src.path} is a GGUF file: vLLM 0.32 loads GGUF only through the "
                                f"vllm-gguf-plugin, on GPU engines; set {key}.gpus_per_actor=1 (with the plugin "
                                f"installed on the cluster), or give the original safetensors checkpoint instead")
            reason = cpu_refusal(config, None if entry.dtype == "auto" else entry.dtype)
            if reason:
                problems.append(f"{where}: {reason}")
        quant = entry.quantization
        if quant == "fp8_per_channel" and entry.dtype == "float32":
            problems.append(f"{where}: quantization=fp8_per_channel takes bfloat16 or float16 weights; set its dtype")
        if rank is not None and rank > 512:
            problems.append(f"{where}: LoRA rank {rank} is above vLLM's 512")
        if scoring and c is not None and c.lora and c.lora_mode == "serve" and not c.text_only:
            problems.append(f"{where}: lora_mode=serve cannot be scored token by token (vLLM's prompt logprobs under an "
                            f"adapter are wrong or fail: vllm-project/vllm#16668); use lora_mode=merge (the default) "
                            f"or set {where}.text_only=true")
    if problems:
        raise ConfigError(problems)
    check_templates(cfg)


def _endpoint_problems(cfg: Config, name: str, where: str, ep, scoring: bool) -> list[str]:
    """A served model's checks: its server answers and serves it (in seconds, one line naming the
    URL and the status), and a token-level cousin is on a vLLM server (teacher-forced scoring
    needs prompt_logprobs, which only vLLM gives)."""
    from cousins.engine.endpoint import EndpointError, served_models

    try:
        owners = served_models(plan.endpoint(ep))
    except EndpointError as e:
        return [f"{where}.endpoint: {e}"]
    c = cfg.cousins.get(name)
    if scoring and c is not None and not c.text_only and owners.get(ep.model) != "vllm":
        return [f"{where}.endpoint: {ep.url} is not a vLLM server (its model list says owned_by="
                f"{owners.get(ep.model)!r}); scoring the original's outputs token by token needs vLLM's "
                f"prompt_logprobs: set {where}.text_only=true to compare texts only"]
    return []


def check_templates(cfg: Config) -> None:
    """ConfigError naming every token-level model that cannot render the corpus's first prompts,
    or (a cousin) renders them to other token ids than the original (the first differing token named)."""
    from cousins.run.corpus import first_prompts
    from cousins.run.storage import resolve
    from cousins.engine.templates import CHECKED_PROMPTS, compare_renders

    c = cfg.corpus
    try:
        prompts = first_prompts(resolve(c.path, **cfg.storage.options), n=CHECKED_PROMPTS, fmt=c.format,
                                fields=c.fields, max_chars=c.max_chars)
    except (OSError, ValueError):
        return  # the prompts stage reports an unreadable corpus with its own words
    if not prompts:
        return

    def model(name: str):
        path = _tokenizer_dir(cfg, name)
        if path is None:
            return None
        s = plan.source(cfg, name)
        return (_where(cfg, name), _tokenizer(path), s.prompt_format, s.chat_template_kwargs)

    original = model(cfg.model.name)
    if original is None:
        return
    cousins = [m for n, cc in cfg.cousins.items() if not cc.text_only and (m := model(n)) is not None]
    problems = compare_renders(original, cousins, prompts)
    if problems:
        raise ConfigError(problems)


def students_to_build(cfg: Config) -> list[str]:
    """Distilled cousins without a build, or built from another build of the original."""
    from cousins.family.models import read_build

    teacher = read_build(cfg.model.path)
    return [n for n, c in cfg.cousins.items() if c.build == TINY_STUDENT
            and ((done := read_build(c.path)) is None or done.get("teacher_build") != teacher)]


def teacher_data_config(cfg: Config, run_id: str) -> Config:
    """The original alone on drift.distill_corpus: the run a distilled cousin learns from."""
    t = copy.deepcopy(cfg)
    t.cousins = {}
    t.corpus.path = cfg.drift.distill_corpus
    t.run.run_id = f"{run_id}.teacher-data"
    t.run.samples = cfg.drift.distill_samples
    # Sampled, whatever the drift run's decoding: distinct samples per prompt, with top-k logprobs for kd.
    t.run.sampling = dataclasses.replace(SamplingConfig(), max_tokens=cfg.run.sampling.max_tokens,
                                         seed=cfg.run.sampling.seed)
    return t


def prepare_before_ray(cfg: Config, *, scoring: bool = False) -> None:
    """Everything about the models that needs no cluster: no build would replace a directory the
    project did not make, the original built if it has a recipe, quantized cousins built,
    vocabularies, every model's files and engine settings and the templates checked (each
    ConfigError lists every problem of its kind). `scoring`: a drift run."""
    from cousins.family.builds import ensure_model

    check_build_targets(cfg)
    ensure_model(cfg.model.path, cfg.model.build, cfg.model.seed)
    build_quantized_cousins(cfg)
    check_vocabularies(cfg)
    check_models(cfg, scoring=scoring)
    if scoring:
        check_kld_routes(cfg)


def check_kld_routes(cfg: Config) -> None:
    """drift.kld=exact: how each compared model's exact pass gets its distributions, printed
    (cousins/engine/plan.py, kld_route); ConfigError naming every model drift.kld_route=hidden
    cannot take, and why."""
    from cousins.contract.records import NOISE_FLOOR

    if cfg.drift.kld != "exact":
        return
    problems = []
    names = [n for n, c in cfg.cousins.items() if not c.text_only] + ([NOISE_FLOOR] if cfg.drift.noise_floor else [])
    for name in names:
        c = cfg.cousins.get(name)
        if c is not None and c.build is not None and not os.path.exists(os.path.join(c.path, "config.json")):
            print(f"exact KLD of {name!r}: its route is decided once it is built", flush=True)
            continue
        route, why = plan.kld_route(cfg, name)
        if cfg.drift.kld_route == "hidden" and route != "hidden":
            problems.append(f"{_where(cfg, name)}: drift.kld_route=hidden, but {why}; use drift.kld_route=auto")
        print(f"exact KLD of {name!r}: " + ("final hidden states, each model's head applied by cousins"
                                            if route == "hidden" else f"vLLM's full-vocabulary logprobs ({why})"),
              flush=True)
    if problems:
        raise ConfigError(problems)
