import json
from dataclasses import replace

from cousins.demo_corpus import DEMO_PATH, DISTILL_PATH, add_answer, demo_records, distill_records, write_demo_corpus
from cousins.drift.metrics import is_correct
from cousins.models import RECIPE_FILE, RECIPES, build_tiny_llama, ensure_model


def test_committed_demo_corpus_is_what_the_generator_writes(tmp_path):
    assert write_demo_corpus(tmp_path / "demo.jsonl").read_bytes() == DEMO_PATH.read_bytes()


def test_committed_distill_corpus_is_what_the_generator_writes_and_shares_no_prompt(tmp_path):
    written = write_demo_corpus(tmp_path / "d.jsonl", distill_records())
    assert written.read_bytes() == DISTILL_PATH.read_bytes()
    demo = {r.get("prompt") for r in demo_records()}
    assert len(distill_records()) >= 200 and not demo & {r["prompt"] for r in distill_records()}


def test_demo_corpus_has_several_kinds_and_references():
    records = demo_records()
    assert 250 <= len(records) <= 400
    cats = {r["category"] for r in records}
    assert {"arithmetic", "factual", "code_completion", "string_transform", "code_instruction", "open_ended"} <= cats
    labelled = [r for r in records if r.get("reference")]
    assert {r["category"] for r in labelled} == {"arithmetic", "factual", "code_completion", "string_transform"}
    assert len(labelled) >= 200 and len(records) - len(labelled) >= 90  # the open prompts stay
    assert len({json.dumps(r.get("prompt") or r["messages"]) for r in records}) == len(records)


def test_worked_additions_say_the_sum_only_at_the_end():
    """A digit-by-digit answer counts as correct for its sum, and none of its steps could pass for it."""
    for a in range(10, 100):
        for b in range(10, 100):
            text = add_answer(a, b)
            steps, said = text.rsplit(" = ", 1)
            assert said == str(a + b) and is_correct(text, str(a + b))
            assert not is_correct(steps, str(a + b)), text
    assert add_answer(51, 99) == "1 + 9 = 10, 5 + 9 + 1 = 15, so 51 + 99 = 150"


def test_tiny_model_build_is_deterministic_from_its_seed(tmp_path):
    small = replace(RECIPES["tiny-teacher"], train_steps=3, corpus_files=20, vocab_size=600)
    a = build_tiny_llama(tmp_path / "a", small)
    b = build_tiny_llama(tmp_path / "b", small)
    c = build_tiny_llama(tmp_path / "c", replace(small, seed=1))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tiny_teacher_is_a_llama_of_about_a_million_parameters_with_a_chat_template(tiny_teacher):
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    meta = json.loads((Path(tiny_teacher) / RECIPE_FILE).read_text())
    assert 0.5e6 <= meta["parameters"] <= 2e6
    assert AutoConfig.from_pretrained(tiny_teacher).model_type == "llama"
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"
    assert tok.decode(tok.encode("def f(x): return x ü")) == "def f(x): return x ü"  # byte-level: lossless


def test_ensure_model_names_a_missing_path(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ensure_model(str(tmp_path / "no-such-model"), None)
