"""The realistic family (cousins/family/realistic.py, cousins/family/llmc.py, cousins/engine/formats.py): a Qwen2-shaped
teacher with a ~110k vocabulary and a padded head, a student padded otherwise, llm-compressor's
cousins, and which of their formats vLLM's CPU build runs.

The builds here are the recipes with fewer training steps (the tokenizer and every shape as built
for real: the full teacher takes ~3 minutes)."""

from __future__ import annotations

import gc
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import hide_context_proxies
from cousins.engine import formats
from cousins.family import builds, llmc
from cousins.family import realistic
from cousins.family.models import RECIPE_FILE
from cousins.contract.recipes import REALISTIC_STUDENT, REALISTIC_TEACHER

SHORT = {REALISTIC_TEACHER: 60, REALISTIC_STUDENT: 60}  # training steps of the reduced builds


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """The reduced teacher, built through ensure_model (the recipe dispatch), and its student."""
    root = tmp_path_factory.mktemp("realistic")
    saved = dict(realistic.RECIPES)
    for name, steps in SHORT.items():
        realistic.RECIPES[name] = replace(saved[name], train_steps=steps, batch_size=16)
    try:
        teacher, student = root / "teacher", root / "student"
        assert builds.ensure_model(str(teacher), REALISTIC_TEACHER) is True
        assert builds.ensure_model(str(teacher), REALISTIC_TEACHER) is False  # current: not built again
        assert realistic.ensure_student(student, teacher) is True
        assert realistic.ensure_student(student, teacher) is False
        yield {"teacher": teacher, "student": student, "root": root}
    finally:
        realistic.RECIPES.update(saved)


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_the_tokenizer_has_over_100k_entries_and_qwens_added_tokens_at_its_end(family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family["teacher"])
    assert len(tok) >= 100_000
    added = {t: tok.convert_tokens_to_ids(t) for t in realistic.SPECIAL + realistic.THINK}
    assert sorted(added.values()) == list(range(len(tok) - 5, len(tok)))  # after the learned entries
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    special = {t.content: t.special for t in tok.added_tokens_decoder.values()}
    assert all(special[t] for t in realistic.SPECIAL) and not any(special[t] for t in realistic.THINK)
    text = "def f(x): return x ü 2026"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless
    assert [tok.decode([i]) for i in tok.encode("2026", add_special_tokens=False)] == ["2", "0", "2", "6"]
    assert (family["student"] / "tokenizer.json").read_bytes() == (family["teacher"] / "tokenizer.json").read_bytes()


def test_the_thinking_markers_are_the_tokenizers_added_tokens_and_split_the_output_by_id(family):
    from transformers import AutoTokenizer

    from cousins.engine import thinking

    tok = AutoTokenizer.from_pretrained(family["teacher"])
    m = thinking.markers(tok)
    assert (m.open, m.close) == tuple(realistic.THINK) and m.close_id == tok.convert_tokens_to_ids("</think>")
    ids = tok.encode("<think>\n4+8: 12\n</think>\n\nThe answer is 12", add_special_tokens=False)
    text = tok.decode(ids, skip_special_tokens=True)
    span = thinking.split(ids, text, m)
    assert span.finished and ids[span.thinking_tokens - 1] == m.close_id
    assert text[span.answer_offset:] == "\n\nThe answer is 12"


def test_heads_are_padded_beyond_the_tokenizer_and_differently_for_teacher_and_student(family):
    from safetensors import safe_open

    n = json.loads((family["teacher"] / RECIPE_FILE).read_text())["tokens"]
    t, s = _config(family["teacher"]), _config(family["student"])
    assert t["model_type"] == s["model_type"] == "qwen2" and t["architectures"] == ["Qwen2ForCausalLM"]
    assert t["vocab_size"] > n and t["vocab_size"] % 256 == 0 and t["vocab_size"] - n < 256
    assert s["vocab_size"] > n and s["vocab_size"] % 1024 == 0 and s["vocab_size"] != t["vocab_size"]
    assert t["num_key_value_heads"] < t["num_attention_heads"] and t["hidden_size"] // t["num_attention_heads"] == 64
    assert (s["hidden_size"], s["num_hidden_layers"]) != (t["hidden_size"], t["num_hidden_layers"])
    assert not t["tie_word_embeddings"]
    for path, cfg in ((family["teacher"], t), (family["student"], s)):
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            assert f.get_slice("lm_head.weight").get_shape() == [cfg["vocab_size"], cfg["hidden_size"]]
        marker = json.loads((path / RECIPE_FILE).read_text())
        # The padding rows as a real model has them: never the argmax, next to no mass, even barely taught.
        assert marker["padding_argmax"] == 0 and marker["padding_mass"] < 1e-3, marker
        assert marker["head_rows"] == cfg["vocab_size"] and marker["positions"] > 100


def test_the_chat_template_has_qwen3s_thinking_switch(family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family["teacher"])
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    render = lambda **kw: tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kw)  # noqa: E731
    assert render() == render(enable_thinking=True) == head
    assert render(enable_thinking=False) == head + "<think>\n\n</think>\n\n"
    whole = tok.apply_chat_template(chat + [{"role": "assistant", "content": "Hello."}], tokenize=False)
    assert whole == head + "Hello.<|im_end|>\n"


def test_the_build_is_deterministic_from_its_seed_and_writes_its_marker_last(family, tmp_path):
    r = realistic.recipe(REALISTIC_TEACHER, 0, train_steps=SHORT[REALISTIC_TEACHER], batch_size=16)
    again = realistic.build(tmp_path / "again", r)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (family["teacher"] / name).read_bytes(), name
    other = realistic.build(tmp_path / "seed1", replace(r, seed=1), tokenizer_from=family["teacher"])
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    files = [p for p in again.iterdir() if p.is_file()]
    assert max(files, key=lambda p: p.stat().st_mtime_ns).name == RECIPE_FILE


def test_a_rebuilt_teacher_makes_its_student_stale(family, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(family["teacher"], teacher)
    r = realistic.recipe(REALISTIC_STUDENT, 0, train_steps=SHORT[REALISTIC_STUDENT], batch_size=16)
    assert realistic.is_current(family["student"], r, teacher)
    marker = json.loads((teacher / RECIPE_FILE).read_text())
    (teacher / RECIPE_FILE).write_text(json.dumps({**marker, "seed": 7}))
    assert not realistic.is_current(family["student"], r, teacher)
    with pytest.raises(FileNotFoundError, match="realistic-teacher"):
        realistic.ensure_student(tmp_path / "s", tmp_path / "no-teacher")


# ------------------------------------------------------------------------------------- formats
W8A8 = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
    "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}}
W4A16 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
    "input_activations": None}}}
W8A16 = {**W4A16, "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                                "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}}
NVFP4 = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"group_0": {
    "weights": {"num_bits": 4, "type": "float", "group_size": 16},
    "input_activations": {"num_bits": 4, "type": "float", "group_size": 16, "dynamic": "local"}}}}


def test_quantization_of_reads_method_and_bits():
    assert formats.quantization_of({"model_type": "qwen2"}) is None
    q = formats.quantization_of({"quantization_config": W8A8})
    assert (q["method"], q["weight_bits"], q["weight_type"], q["activation_bits"]) == ("compressed-tensors", 8, "int", 8)
    q = formats.quantization_of(W4A16)  # a quantization_config alone
    assert (q["weight_bits"], q["activation_bits"], q["group_size"], q["format"]) == (4, 16, 128, "pack-quantized")
    q = formats.quantization_of({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})
    assert (q["method"], q["weight_bits"], q["activation_bits"]) == ("gptq", 4, 16)
    q = formats.quantization_of({"quantization_config": {"quant_method": "awq", "w_bit": 4, "q_group_size": 64}})
    assert (q["weight_bits"], q["group_size"]) == (4, 64)
    q = formats.quantization_of({"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}})
    assert (q["weight_type"], q["weight_bits"], q["activation_bits"]) == ("float", 8, 8)
    q = formats.quantization_of({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    assert q["weight_bits"] == 4 and q["activation_bits"] == 16


def test_cpu_refusal_names_what_fails_and_what_to_do():
    assert formats.cpu_refusal({"model_type": "qwen2"}) is None
    assert formats.cpu_refusal({"quantization_config": W8A8}) is None
    assert formats.cpu_refusal({"quantization_config": W4A16, "torch_dtype": "bfloat16"}) is None
    fp32 = formats.cpu_refusal({"quantization_config": W4A16, "torch_dtype": "float32"})
    assert "cpu_gemm_wna16" in fp32 and "bfloat16" in fp32 and "engine.gpus_per_actor=1" in fp32
    assert formats.cpu_refusal({"quantization_config": W4A16, "torch_dtype": "float32"}, dtype="bfloat16") is None
    for cfg in (W8A16, NVFP4):
        msg = formats.cpu_refusal({"quantization_config": cfg, "torch_dtype": "bfloat16"})
        assert "does not run on vLLM's CPU build" in msg and "engine.gpus_per_actor=1" in msg, msg
    gptq = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
    assert "float16/bfloat16" in formats.cpu_refusal(gptq) and formats.cpu_refusal(gptq, dtype="bfloat16") is None
    # not measured here: left to vLLM, whose own error then names it
    assert formats.cpu_refusal({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}) is None


# --------------------------------------------------------------------------- llm-compressor + vLLM
CPU_FORMATS = {"llmc-w8a8-int8": "float32", "llmc-fp8-dynamic": "float32", "llmc-w4a16": "bfloat16",
               "llmc-gptq-w4a16": "bfloat16", "llmc-awq-w4a16": "bfloat16"}
GPU_FORMATS = {"llmc-w8a16": "bfloat16", "llmc-w4a16": "bfloat16", "llmc-gptq-w4a16": "bfloat16"}


@pytest.fixture(scope="module")
def llmc_cousins(family) -> dict[str, Path]:
    """Every llm-compressor cousin of the reduced teacher, made in one oneshot subprocess."""
    outs = {r: family["root"] / r for r in {**CPU_FORMATS, **GPU_FORMATS}}
    for out in outs.values():
        out.mkdir(exist_ok=True)
    reports = llmc.build_many(family["teacher"], outs)
    assert {r["llmcompressor_version"] for r in reports.values()} == {"0.14.0.1"}
    return outs


def _greedy(path: Path, dtype: str) -> list:
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"})
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False) for q in ("What is the capital of France?", "What is 7 times 8?")]
    with hide_context_proxies():  # the suite's S3 server put Flask proxies in this process
        llm = LLM(model=str(path), dtype=dtype, max_model_len=256, kv_cache_memory_bytes=256 << 20,
                  enforce_eager=True, distributed_executor_backend="uni", max_logprobs=5, seed=0)
    try:
        return [o.outputs[0] for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, logprobs=5))]
    finally:
        del llm
        gc.collect()


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe", sorted(CPU_FORMATS))
def test_llmc_cousin_loads_and_generates_in_vllm_on_cpu(recipe, llmc_cousins, family):
    cfg = _config(llmc_cousins[recipe])
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg["vocab_size"] == _config(family["teacher"])["vocab_size"]  # the padded head, kept whole
    assert formats.cpu_refusal(cfg, dtype=CPU_FORMATS[recipe]) is None
    outs = _greedy(llmc_cousins[recipe], CPU_FORMATS[recipe])
    assert len(outs) == 2 and all(len(o.token_ids) >= 1 and len(o.logprobs[0]) >= 5 for o in outs)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_int4_in_float32_fails_on_cpu_as_cpu_refusal_says(llmc_cousins):
    cfg = _config(llmc_cousins["llmc-w4a16"])
    assert "cpu_gemm_wna16" in formats.cpu_refusal(cfg, dtype="float32")
    assert "does not run on vLLM's CPU build" in formats.cpu_refusal(_config(llmc_cousins["llmc-w8a16"]))
    with pytest.raises(NotImplementedError, match="cpu_gemm_wna16"):
        _greedy(llmc_cousins["llmc-w4a16"], "float32")


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe", sorted(GPU_FORMATS))
def test_llmc_cousin_runs_on_a_gpu_engine(recipe, llmc_cousins):
    """W8A16, which vLLM's CPU build refuses in any dtype, and the int4 formats, on a GPU engine
    (16-bit activations: GPU int4 kernels take no float32 either)."""
    outs = _greedy(llmc_cousins[recipe], GPU_FORMATS[recipe])
    assert len(outs) == 2 and all(len(o.token_ids) >= 1 for o in outs)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_exact_kld_from_hidden_states_equals_vllms_full_vocabulary_lists(llmc_cousins, family):
    """The exact-KLD reduction by hidden states (pooling engines, each model's head applied by us)
    against the one from vLLM's full-vocabulary logprobs, on the realistic family: the teacher
    (head 110,080 rows) against a W8A8 cousin (float32), an int4 cousin in bfloat16, and the student
    (head 110,592 rows, another width). Every token's KLD, reverse KLD and tail mass within 1e-6 +
    1e-4 relative. The teacher's two engines serve every cousin (the actor's path around these
    functions is tests/test_head.py's and tests/test_kld.py's)."""
    import numpy as np
    from transformers import AutoTokenizer

    from cousins.drift.vocab_kld import exact_kld
    from cousins.engine import backend as engine
    from cousins.engine.backend import hidden_states
    from cousins.engine.head import exact_rows
    from cousins.engine.kld_actor import full_spec, hidden_spec

    tok = AutoTokenizer.from_pretrained(family["teacher"])
    texts = ["What is the capital of France? The capital of France is Paris, on the Seine.",
             "def main(args):\n    return sorted(args, key=len)\n",
             "Seven times eight is fifty-six, and six times nine is fifty-four."]
    rows = [tuple(tok.encode(part, add_special_tokens=False) for part in (t[: len(t) // 3], t[len(t) // 3:]))
            for t in texts]
    prompts = [{"prompt_token_ids": a + b} for a, b in rows]
    vocab = len(tok)

    def spec(name, path, dtype):
        return engine.EngineSpec(model_name=name, model_path=str(path), dtype=dtype, quantization=None,
                                 max_model_len=128, kv_cache_bytes=64 << 20, tensor_parallel_size=1, max_num_seqs=8,
                                 enforce_eager=True, max_logprobs=20)

    backend = engine.VllmBackend()
    params = backend.params(max_tokens=1, temperature=0.0, prompt_logprobs=-1, detokenize=False, flat_logprobs=True)

    def both(s):
        """(hidden states and head, full-vocabulary logprobs) of `s`'s engines on the rows."""
        pooled, listed = backend.load(hidden_spec(s)), backend.load(full_spec(s))
        try:
            return (hidden_states(pooled, prompts), backend.head(pooled, s)), listed.generate(prompts, params,
                                                                                              use_tqdm=False)
        finally:
            del pooled, listed
            gc.collect()

    with hide_context_proxies():
        (hp, head_p), lp = both(spec("teacher", family["teacher"], "float32"))
        for name, path, dtype in (("w8a8", llmc_cousins["llmc-w8a8-int8"], "float32"),
                                  ("w4a16", llmc_cousins["llmc-w4a16"], "bfloat16"),
                                  ("student", family["student"], "float32")):
            (hq, head_q), lq = both(spec(name, path, dtype))
            at = [(len(a) - 1, len(a) + len(b) - 1) for a, b in rows]  # the states that predict the outputs
            new = exact_rows([h[s:e] for h, (s, e) in zip(hp, at)], [h[s:e] for h, (s, e) in zip(hq, at)],
                             head_p, head_q, vocab)
            old = [exact_kld(p.prompt_logprobs, q.prompt_logprobs, len(a), len(b), vocab)
                   for p, q, (a, b) in zip(lp, lq, rows)]
            for k in ("kld", "rkld", "tail_mass"):
                np.testing.assert_allclose(np.concatenate([getattr(x, k) for x in new]),
                                           np.concatenate([getattr(x, k) for x in old]), rtol=1e-4, atol=1e-6,
                                           err_msg=f"{name} {k}")
            kld = np.concatenate([x.kld for x in old])
            print(f"\n{name}: {len(kld)} tokens, KLD mean {kld.mean():.4g}; hidden - lists: max "
                  f"{np.abs(np.concatenate([x.kld for x in new]) - kld).max():.2g}")
