"""Per-model engine blocks, settings read from a model's own config, the checks before Ray
(cousins/engine/plan.py, cousins/family/prepare.py: check_models, check_templates) and the prompt formats
(cousins/engine/templates.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import compose
from cousins.engine import plan
from cousins.engine import templates
from cousins.contract.config import ConfigError, resolve_paths, to_config
from cousins.contract.validate import validate
from cousins.family.prepare import check_models, check_templates


def _cfg(tiny_teacher, tmp_path, *overrides, name="drift"):
    return resolve_paths(to_config(compose(f"model.path={tiny_teacher}", f"storage.root={tmp_path / 'out'}",
                                           "cousins=none", *overrides, config_name=name)))


def _copy(tiny_teacher, where: Path, **config_changes) -> Path:
    shutil.copytree(tiny_teacher, where)
    if config_changes:
        c = json.loads((where / "config.json").read_text())
        c.update(config_changes)
        (where / "config.json").write_text(json.dumps(c))
    return where


def test_each_model_runs_its_own_engine_block_over_the_shared_one(tiny_teacher, tmp_path):
    cfg = _cfg(tiny_teacher, tmp_path, "engine.num_actors=2", "+model.engine.max_num_seqs=32",
               f"+cousins.small={{path: '{tiny_teacher}', kind: distilled, engine: {{num_actors: 1, batch_size: 8, "
               f"max_model_len: 128}}}}")
    validate(cfg)
    entries = {e.name: e for e in plan.model_entries(cfg, noise_floor=True)}
    original, small = plan.engine_spec(cfg, entries["tiny-teacher"]), plan.engine_spec(cfg, entries["small"])
    assert original.max_num_seqs == 32 and small.max_num_seqs == 128  # no inheritance of the original's overrides
    assert plan.placement(cfg, "tiny-teacher").num_actors == 2 and plan.placement(cfg, "small").num_actors == 1
    assert plan.placement(cfg, "small").batch_size == 8 and small.max_model_len == 128
    assert plan.engine_spec(cfg, entries["noise-floor"]).max_num_seqs == 32  # the noise floor is the original


def test_context_and_cpu_kv_cache_come_from_the_models_config(tiny_teacher, tmp_path):
    cfg = _cfg(tiny_teacher, tmp_path)
    spec = plan.engine_spec(cfg, plan.model_entries(cfg)[0])
    assert spec.max_model_len == 1024  # max_position_embeddings of the tiny teacher
    # 2 layers x 2 KV heads x head_dim 64 x (K and V) x fp32 = 2 KiB a token, x 1024 x 128 sequences
    assert spec.kv_cache_bytes == 2048 * 1024 * 128
    long = _copy(tiny_teacher, tmp_path / "long", max_position_embeddings=131072)
    cfg = _cfg(long, tmp_path, "model.build=null", "engine.max_num_seqs=512")
    spec = plan.engine_spec(cfg, plan.model_entries(cfg)[0])
    assert spec.max_model_len == 8192  # capped: engine.max_model_len_cap
    assert spec.kv_cache_bytes == 4 << 30  # 8 GiB for 512 sequences, capped: engine.cpu_kv_cache_cap_gib
    from cousins.engine.backend import llm_kwargs

    gpu = _cfg(long, tmp_path, "model.build=null", "engine.gpus_per_actor=1")
    spec = plan.engine_spec(gpu, plan.model_entries(gpu)[0])
    assert "kv_cache_memory_bytes" not in llm_kwargs(spec, on_cpu=False)  # vLLM's GPU memory share decides
    assert llm_kwargs(spec, on_cpu=True)["kv_cache_memory_bytes"] == spec.kv_cache_bytes  # CPU needs a size
    capped = _cfg(long, tmp_path, "model.build=null", "engine.gpus_per_actor=1", "engine.kv_cache_gib=2")
    assert llm_kwargs(plan.engine_spec(capped, plan.model_entries(capped)[0]), on_cpu=False)[
        "kv_cache_memory_bytes"] == 2 << 30


def test_engine_overrides_are_validated_per_model_all_at_once(tiny_teacher, tmp_path):
    cfg = _cfg(tiny_teacher, tmp_path, "drift.kld=exact", "+model.engine.bogus=1",
               f"+cousins.big={{path: '{tiny_teacher}', engine: {{tensor_parallel_size: 2}}}}",
               f"+cousins.typo={{path: '{tiny_teacher}', engine: {{num_actors: many}}}}")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = "\n".join(e.value.problems)
    assert "model.engine: unknown key(s) ['bogus']" in text
    assert "cousins.big.engine.tensor_parallel_size / pipeline_parallel_size > 1 need GPUs" in text
    assert "'big' needs an engine of one GPU" in text  # exact KLD, named by model
    assert "cousins.typo.engine" in text


def test_check_models_names_every_model_whose_settings_cannot_work(tiny_teacher, tmp_path):
    w4 = _copy(tiny_teacher, tmp_path / "w4a16", quantization_config={
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int", "group_size": 128},
                                      "input_activations": None, "targets": ["Linear"]}}})
    gguf = tmp_path / "model-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = _cfg(tiny_teacher, tmp_path, "run.sampling.max_tokens=64",
               f"+cousins.w4={{path: '{w4}', kind: quantized}}",
               f"+cousins.gg={{path: '{gguf}', tokenizer: '{tiny_teacher}', kind: quantized}}",
               f"+cousins.short={{path: '{tiny_teacher}', engine: {{max_model_len: 32}}}}",
               f"+cousins.long={{path: '{tiny_teacher}', engine: {{max_model_len: 4096}}}}",
               "+cousins.fp8={quantization: fp8_per_channel, dtype: float32, kind: quantized}")
    validate(cfg)
    with pytest.raises(ConfigError) as e:
        check_models(cfg)
    text = "\n".join(e.value.problems)
    assert "cousins.w4: " in text and "does not run on vLLM's CPU build in float32" in text  # (formats.py)
    assert "set this model's dtype to bfloat16" in text
    assert "cousins.gg:" in text and "vllm-gguf-plugin" in text
    assert "cousins.short: run.sampling.max_tokens (64) must be below its max_model_len (32)" in text
    assert "cousins.long: cousins.long.engine.max_model_len=4096 is beyond the model's own context (1024" in text
    assert "cousins.fp8: quantization=fp8_per_channel takes bfloat16" in text


def test_a_gguf_file_needs_its_tokenizer_named(tiny_teacher, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="a GGUF file needs its tokenizer named"):
        validate(_cfg(tiny_teacher, tmp_path, f"+cousins.gg={{path: '{gguf}', kind: quantized}}"))


# --- templates ---------------------------------------------------------------------------------

THINKING = ("<|bos|>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% if enable_thinking is defined and not enable_thinking %}"
            "<think></think>\n{% endif %}{% endif %}")


def _with_template(tiny_teacher, where: Path, template: str) -> Path:
    _copy(tiny_teacher, where)
    tc = json.loads((where / "tokenizer_config.json").read_text())
    tc["chat_template"] = template
    (where / "tokenizer_config.json").write_text(json.dumps(tc))
    (where / "chat_template.jinja").unlink(missing_ok=True)
    return where


def test_chat_template_kwargs_reach_the_template_and_raw_prompts_skip_it(tiny_teacher, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_with_template(tiny_teacher, tmp_path / "thinking", THINKING))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    on = templates.render(tok, messages)
    off = templates.render(tok, messages, chat_template_kwargs={"enable_thinking": False})
    assert off == on + "<think></think>\n"
    raw = templates.render(tok, messages, prompt_format="raw")
    assert raw == "Be brief.\n\n2 + 2?"
    assert templates.encode(tok, raw, prompt_format="raw") == tok(raw)["input_ids"]  # the tokenizer's own specials


def test_a_cousin_whose_template_renders_other_tokens_is_refused_naming_the_first_difference(tiny_teacher,
                                                                                          tmp_path):
    thinking = _with_template(tiny_teacher, tmp_path / "thinking", THINKING)
    cfg = _cfg(thinking, tmp_path, "model.build=null", "corpus.limit=8",
               f"+cousins.nothink={{path: '{thinking}', chat_template_kwargs: {{enable_thinking: false}}}}",
               f"+cousins.same={{path: '{thinking}'}}",
               f"+cousins.words={{path: '{thinking}', text_only: true, chat_template_kwargs: {{enable_thinking: false}}}}")
    with pytest.raises(ConfigError) as e:
        check_templates(cfg)
    assert len(e.value.problems) == 1  # `same` renders alike; the text-only cousin is not scored
    msg = e.value.problems[0]
    assert msg.startswith("cousins.nothink: renders the corpus's prompt 0 to other tokens than 'model'")
    assert "(end of prompt) (original)" in msg and "cousins.nothink.text_only=true" in msg
    # the same kwargs on the original (every cousin inherits them unless it sets its own): no problem
    check_templates(_cfg(thinking, tmp_path, "model.build=null", "+model.chat_template_kwargs.enable_thinking=false",
                         f"+cousins.nothink={{path: '{thinking}'}}"))


def test_a_base_model_without_a_template_is_told_to_take_raw_prompts(tiny_teacher, tmp_path):
    base = _copy(tiny_teacher, tmp_path / "base")
    tc = json.loads((base / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tc))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="model.prompt_format=raw"):
        check_templates(_cfg(base, tmp_path, "model.build=null"))
    check_templates(_cfg(base, tmp_path, "model.build=null", "model.prompt_format=raw"))
