"""Who runs in a drift run (cousins/family/prepare.py, cousins/engine/plan.py): cousins validated all at once, model entries,
vocabularies checked before any cluster work."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import compose
from cousins.contract.config import CousinConfig, ConfigError, resolve_paths, to_config
from cousins.contract.validate import validate
from cousins.family.prepare import check_vocabularies, students_to_build, teacher_data_config
from cousins.engine.plan import model_entries, reordered_batch_size
from cousins.contract.records import NOISE_FLOOR


def drift_config(tiny_teacher, *overrides):
    return resolve_paths(to_config(compose(f"model.path={tiny_teacher}", *overrides, config_name="drift")))


def test_drift_yaml_composes_to_the_demo_cousins(tiny_teacher):
    cfg = drift_config(tiny_teacher)
    validate(cfg)
    assert cfg.run.samples == 1 and cfg.run.sampling.temperature == 0.0
    kinds = {n: c.kind for n, c in cfg.cousins.items()}
    assert kinds["rtn-int4"] == "quantized" and kinds["student-kd"] == "distilled"
    assert cfg.cousins["fp8-per-channel"].path is None and cfg.cousins["fp8-per-channel"].quantization
    names = [e.name for e in model_entries(cfg, noise_floor=True)]
    assert names[0] == "tiny-teacher" and names[-1] == NOISE_FLOOR and len(names) == len(cfg.cousins) + 2
    noise = model_entries(cfg, noise_floor=True)[-1]
    assert noise.path == cfg.model.path and noise.reorder
    assert reordered_batch_size(cfg.engine.batch_size) != cfg.engine.batch_size


def test_cousin_errors_are_reported_together(tiny_teacher, tmp_path):
    cfg = drift_config(tiny_teacher, "cousins=none", "+cousins.noise-floor={quantization:fp8_per_channel}",
                       "+cousins.b={kind:squashed,path:/nonexistent}", "+cousins.c={build:magic}",
                       "+cousins.d={kind:other}", "drift.score_topk=99",
                       "drift.answer_match=regex", "corpus.answer.checker=fuzzy",
                       "+corpus.answer.by_category.algebra=nope", "corpus.answer.which=middle")
    cfg.cousins["../up"] = CousinConfig(kind="quantized", quantization="fp8_per_channel")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    for needle in ("'noise-floor' is reserved", "cousins.../up: the name '../up': use letters", "cousins.b.kind",
                   "cousins.b: model directory not found", "cousins.c.build 'magic'", "cousins.c: build=magic needs a path",
                   "cousins.d: without a path", "drift.score_topk", "corpus.answer.checker 'fuzzy'",
                   "corpus.answer.by_category.algebra 'nope'", "corpus.answer.which", "regex answer checker needs corpus.answer.pattern"):
        assert needle in text, needle
    assert len(e.value.problems) >= 9


def test_the_same_weights_prompted_otherwise_are_a_cousin(tiny_teacher):
    """"The same weights, thinking off": a cousin without a path whose chat_template_kwargs differ."""
    from cousins.engine import plan

    cfg = drift_config(tiny_teacher, "cousins=none", "+model.chat_template_kwargs.enable_thinking=true",
                       "+cousins.thinking-off={kind:other,text_only:true,chat_template_kwargs:{enable_thinking:false}}")
    validate(cfg)
    off = plan.source(cfg, "thinking-off")
    assert off.path == cfg.model.path and off.chat_template_kwargs == {"enable_thinking": False}
    assert plan.source(cfg, cfg.model.name).chat_template_kwargs == {"enable_thinking": True}


def test_a_cousin_with_another_vocabulary_is_refused_naming_both(tiny_teacher, tmp_path):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_teacher, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, another vocabulary
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cfg = drift_config(tiny_teacher, "cousins=none", f"+cousins.odd={{path:'{other}',kind:other}}")
    validate(cfg)
    with pytest.raises(ConfigError) as e:
        check_vocabularies(cfg)
    msg = str(e.value)
    assert str(other) in msg and tiny_teacher in msg and "text_only=true" in msg
    cfg.cousins["odd"].text_only = True  # texts only: allowed
    check_vocabularies(cfg)
    same = drift_config(tiny_teacher, "cousins=none", f"+cousins.same={{path:'{tiny_teacher}'}}")
    check_vocabularies(same)


def test_unknown_cousin_keys_are_reported_together(tiny_teacher):
    with pytest.raises(ConfigError) as e:
        drift_config(tiny_teacher, "+cousins.z={kindd:other}", "+cousins.y={pth:/x}")
    assert len(e.value.problems) == 2 and "kindd" in str(e.value) and "pth" in str(e.value)


def test_teacher_data_run_is_the_original_alone_on_the_distill_corpus(tiny_teacher):
    cfg = drift_config(tiny_teacher, "run.run_id=r1")
    t = teacher_data_config(cfg, "r1")
    assert t.cousins == {} and t.run.run_id == "r1.teacher-data" and t.corpus.path.endswith("demo-distill.jsonl")
    assert cfg.run.sampling.temperature == 0 and t.run.sampling.temperature > 0 and t.run.sampling.logprobs >= 5
    assert cfg.cousins and cfg.corpus.path.endswith("demo.jsonl")  # the original config is untouched


def test_a_student_of_another_teacher_build_is_trained_again(tiny_teacher, tmp_path):
    from cousins.family.models import RECIPE_FILE, read_build

    student = tmp_path / "student"
    cfg = drift_config(tiny_teacher, "cousins=none",
                       f"+cousins.s={{build:tiny-student,kind:distilled,path:'{student}'}}")
    assert students_to_build(cfg) == ["s"]  # none built
    student.mkdir()
    marker = student / RECIPE_FILE
    marker.write_text(json.dumps({"recipe": "tiny-student", "teacher_build": read_build(tiny_teacher)}))
    assert students_to_build(cfg) == []
    marker.write_text(json.dumps({"recipe": "tiny-student", "teacher_build": {"train_steps": 150}}))
    assert students_to_build(cfg) == ["s"]  # trained on an older teacher


def test_a_stale_student_is_not_refused_for_its_old_tokenizer_it_is_trained_again(tiny_teacher, tmp_path):
    """After the original is rebuilt (a new tokenizer), its student still holds the old one until
    it is trained again: the vocabulary check lets it through because it will be rebuilt."""
    from cousins.family.models import RECIPE_FILE

    student = tmp_path / "student"
    shutil.copytree(tiny_teacher, student)
    tok = json.loads((student / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (student / "tokenizer.json").write_text(json.dumps(tok))
    (student / RECIPE_FILE).write_text(json.dumps({"recipe": "tiny-student", "teacher_build": {"train_steps": 1}}))
    cfg = drift_config(tiny_teacher, "cousins=none",
                       f"+cousins.s={{build:tiny-student,kind:distilled,path:'{student}'}}")
    assert students_to_build(cfg) == ["s"]
    check_vocabularies(cfg)  # stale: trained again before it is compared
    from cousins.family.models import read_build

    (student / RECIPE_FILE).write_text(json.dumps({"recipe": "tiny-student", "teacher_build": read_build(tiny_teacher)}))
    with pytest.raises(ConfigError):
        check_vocabularies(cfg)  # current, yet another vocabulary: refused
