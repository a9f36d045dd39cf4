"""The original and its cousins as a run needs them: built where absent, vocabularies checked.

- Quantized cousins with a `build` recipe are made from the original's weights before Ray starts
  (cousins/quantize.py).
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

from cousins.config import Config, ConfigError, SamplingConfig
from cousins.recipes import QUANT_RECIPES, REALISTIC_STUDENT, TINY_STUDENT


def build_quantized_cousins(cfg: Config) -> list[str]:
    """Build every absent quantized cousin from the original, and every realistic student (taught
    the lessons, not a run: it needs no cluster); the names built."""
    from cousins import quantize, realistic

    built = []
    for name, c in cfg.cousins.items():
        if c.build == REALISTIC_STUDENT and realistic.ensure_student(c.path, cfg.model.path, cfg.model.seed):
            built.append(name)
        if c.build in QUANT_RECIPES and not quantize.is_current(c.path, cfg.model.path, c.build):
            print(f"building cousin {name!r}: {c.build} of {cfg.model.path} -> {c.path}", flush=True)
            quantize.build_quantized(cfg.model.path, c.path, c.build)
            built.append(name)
    return built


def _vocab(path: str) -> dict[str, int] | None:
    if "://" in path or not os.path.isdir(path):
        return None  # not local: vLLM will fetch it; checked by the engine's own load
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def check_vocabularies(cfg: Config) -> None:
    """ConfigError naming every token-level cousin whose tokenizer differs from the original's."""
    original = _vocab(cfg.model.path)
    if original is None:
        return
    problems = []
    rebuilt = set(students_to_build(cfg))  # a student of an older build is trained again, on this tokenizer
    for name, c in cfg.cousins.items():
        if (c.text_only or c.path is None or name in rebuilt
                or not os.path.exists(os.path.join(c.path, "config.json"))):
            continue
        vocab = _vocab(c.path)
        if vocab is not None and vocab != original:
            only = len(set(vocab.items()) ^ set(original.items()))
            problems.append(
                f"cousins.{name}: its tokenizer ({c.path}, {len(vocab)} tokens) differs from the original "
                f"{cfg.model.name!r}'s ({cfg.model.path}, {len(original)} tokens; {only} entries differ). "
                f"Token-level drift needs a shared vocabulary; set cousins.{name}.text_only=true to compare "
                f"texts only")
    if problems:
        raise ConfigError(problems)


def students_to_build(cfg: Config) -> list[str]:
    """Distilled cousins without a build, or built from another build of the original."""
    from cousins.models import read_build

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


def prepare_before_ray(cfg: Config) -> None:
    """Everything about the models that needs no cluster: the original built if it has a recipe,
    quantized cousins built, vocabularies checked (ConfigError lists every mismatch)."""
    from cousins.models import ensure_model

    ensure_model(cfg.model.path, cfg.model.build, cfg.model.seed)
    build_quantized_cousins(cfg)
    check_vocabularies(cfg)
