import json
import random
from dataclasses import replace

import pytest

from conftest import hide_context_proxies
from cousins.family import models
from cousins.family.demo_corpus import (DEMO_PATH, DISTILL_PATH, add_answer, add_prompt, demo_records, distill_records,
                                 reverse_letters, write_demo_corpus)
from cousins.drift.answers import correct, judge
from cousins.family.lessons import held_out, lessons
from cousins.family.builds import ensure_model
from cousins.family.models import RECIPE_FILE, RECIPES, build_tiny_llama


def test_committed_demo_corpus_is_what_the_generator_writes(tmp_path):
    assert write_demo_corpus(tmp_path / "demo.jsonl").read_bytes() == DEMO_PATH.read_bytes()


def test_committed_distill_corpus_is_what_the_generator_writes_and_shares_no_prompt(tmp_path):
    written = write_demo_corpus(tmp_path / "d.jsonl", distill_records())
    assert written.read_bytes() == DISTILL_PATH.read_bytes()
    demo = {r.get("prompt") for r in demo_records()}
    assert len(distill_records()) >= 200 and not demo & {r["prompt"] for r in distill_records()}


def test_the_reasoning_corpus_is_what_the_generator_writes_and_every_reference_reads_under_auto(tmp_path):
    """corpus=reasoning: word problems with GSM8K `#### N` solutions, sums, reversals and multiple
    choice; its sums are the demo's held-out ones, and auto reads every reference."""
    from cousins.drift.answers import check_reference
    from cousins.family.demo_corpus import REASONING_PATH, reasoning_records

    records = reasoning_records()
    assert write_demo_corpus(tmp_path / "r.jsonl", records).read_bytes() == REASONING_PATH.read_bytes()
    kinds = {r["category"] for r in records}
    assert kinds == {"word_problem", "arithmetic", "string_transform", "multiple_choice", "multiple_choice_sum"}
    for r in records:
        check_reference(r["reference"], "auto", r.get("choices"))  # raises if auto cannot read it
        if r.get("choices"):
            assert r["reference"] in "ABCD" and len(r["choices"]) == 4
    words = [r for r in records if r["category"] == "word_problem"]
    assert all(r["reference"].rsplit("#### ", 1)[1] == r["reference"].split(" = ")[-1].split(",")[0] for r in words)
    held = held_out()["add"]
    sums = [tuple(int(x) for x in r["reference"].split(", so ")[-2].split(" = ")[0].split(" + ")) for r in words]
    assert all(pair in held for pair in sums)


def test_the_realistic_lessons_carry_thinking_forms_and_the_tiny_teachers_do_not():
    from cousins.family.lessons import realistic_lessons

    tiny = lessons(random.Random(0), 400)
    assert not any("thinking" in c[-1] for c in tiny)
    real = realistic_lessons(random.Random(0), 400)
    kinds = {c[-2]["content"].split("\n")[-1] == "Answer:" for c in real}
    assert kinds == {True, False}  # multiple-choice lessons among the others
    traced = [c[-1] for c in real if "thinking" in c[-1]]
    assert len(traced) > 100 and all(t["thinking"].startswith("<think>\n") and "\n</think>\n\n" in t["thinking"]
                                     for t in traced)
    for c in real:  # a word problem's answer ends "#### N", thinking or not, and auto judges it right
        if "#### " in c[-1]["content"]:
            n = c[-1]["content"].rsplit("#### ", 1)[1]
            assert judge(c[-1]["thinking"], n).correct and judge(c[-1]["content"], n).correct


def test_demo_corpus_has_several_kinds_and_references():
    records = demo_records()
    assert 250 <= len(records) <= 400
    cats = {r["category"] for r in records}
    assert {"arithmetic", "factual", "code_completion", "string_transform", "code_instruction", "open_ended"} <= cats
    labelled = [r for r in records if r.get("reference")]
    assert {r["category"] for r in labelled} == {"arithmetic", "factual", "code_completion", "string_transform"}
    assert len(labelled) >= 200 and len(records) - len(labelled) >= 90  # the open prompts stay
    assert len({json.dumps(r.get("prompt") or r["messages"]) for r in records}) == len(records)


def test_lessons_hold_out_the_demos_additions_and_reversals_and_teach_its_look_ups():
    r = RECIPES["tiny-teacher"]
    taught = lessons(random.Random(r.seed), r.train_steps * r.batch_size)  # what the default build sees
    users = {c[-2]["content"] for c in taught}
    answers = {c[-1]["content"] for c in taught}
    demo = {r["prompt"]: r for r in demo_records() if r.get("reference")}
    adds = [p for p in demo if " + " in p]
    reversals = [r["reference"] for r in demo.values() if r["category"] == "string_transform"]
    assert len(adds) >= 50 and len(reversals) >= 20
    swapped = {add_prompt(*reversed([int(x) for x in p.removeprefix("What is ").removesuffix("?").split(" + ")]))
               for p in adds}
    assert not users & (set(adds) | swapped)  # neither a + b nor b + a
    assert not (set(reversals) | {reverse_letters(x) for x in reversals}) & answers  # no run, either way
    assert held_out()["reverse"] >= set(reversals) and len(held_out()["add"]) >= len(adds)
    facts = [p for p, r in demo.items() if r["category"] in ("factual", "code_completion")]
    assert facts and all(p in users for p in facts)  # look-ups are taught whole
    times = [p for p in demo if " times " in p]
    assert sum(p in users for p in times) >= 0.9 * len(times)  # the times table: drawn at random, nearly whole


def test_worked_additions_say_the_sum_only_at_the_end():
    """A digit-by-digit answer counts as correct for its sum, and none of its steps could pass for it."""
    for a in range(10, 100):
        for b in range(10, 100):
            text = add_answer(a, b)
            steps, said = text.rsplit(" = ", 1)
            assert said == str(a + b) and correct(text, str(a + b), "contains")
            assert not correct(steps, str(a + b), "contains"), text
            assert judge(text, str(a + b)).correct and not judge(steps, str(a + b)).correct, text
    assert add_answer(51, 99) == "1 + 9 = 10, 5 + 9 + 1 = 15, so 51 + 99 = 150"


SMALL = replace(RECIPES["tiny-teacher"], train_steps=3, batch_size=8, corpus_files=20, vocab_size=600)


def test_tiny_model_build_is_deterministic_from_its_seed(tmp_path):
    small = SMALL
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
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ensure_model(str(tmp_path / "no-such-model"), None)


def test_ensure_model_builds_again_when_the_recipe_or_the_lessons_change(tmp_path, monkeypatch):
    path = str(tmp_path / "teacher")
    monkeypatch.setitem(RECIPES, "tiny-teacher", SMALL)
    assert ensure_model(path, "tiny-teacher") is True
    assert ensure_model(path, "tiny-teacher") is False and models.is_current(path, "tiny-teacher")
    assert not models.is_current(path, "tiny-teacher", seed=1)
    monkeypatch.setitem(RECIPES, "tiny-teacher", replace(SMALL, train_steps=2))
    assert ensure_model(path, "tiny-teacher") is True and models.read_build(path)["train_steps"] == 2
    monkeypatch.setattr("cousins.family.lessons.WEIGHTS", {"capital": 1.0})
    assert not models.is_current(path, "tiny-teacher")  # other lessons
    assert ensure_model(path, "tiny-teacher") is True


# --- integration: the teacher knows its answers and is sure of them -------------------------------

@pytest.mark.integration
@pytest.mark.timeout(600)
def test_tiny_teacher_answers_the_labelled_demo_prompts_and_keeps_its_mass_in_its_top_20(tiny_teacher, monkeypatch):
    """Greedy in vLLM on the whole demo corpus, as the drift job decodes it (run=greedy, 64 tokens):
    at least 60% of the labelled prompts answered correctly, and on average at least 95% of the
    teacher's probability in its top-20 at every position of its own answers (the mass the top-k
    drift metrics see)."""
    import math

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    records = demo_records()
    texts = [tok.apply_chat_template(r.get("messages") or [{"role": "user", "content": r["prompt"]}],
                                     add_generation_prompt=True, tokenize=False) for r in records]
    with hide_context_proxies():  # the suite's S3 server put Flask proxies in this process
        llm = LLM(model=tiny_teacher, dtype="float32", max_model_len=256, kv_cache_memory_bytes=256 << 20,
                  enforce_eager=True, distributed_executor_backend="uni", max_logprobs=20,
                  logprobs_mode="raw_logprobs", seed=0)
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=64, logprobs=20))
    labelled = [(r, o) for r, o in zip(records, outs) if r.get("reference")]
    accuracy = sum(judge(o.outputs[0].text, r["reference"]).correct for r, o in labelled) / len(labelled)
    masses = [sum(math.exp(lp.logprob) for lp in sorted(pos.values(), key=lambda lp: -lp.logprob)[:20])
              for o in outs for pos in o.outputs[0].logprobs]
    top20 = sum(masses) / len(masses)
    print(f"tiny teacher on the demo: {accuracy:.1%} of {len(labelled)} labelled prompts correct; "
          f"top-20 mass {top20:.4f} over {len(masses)} answer tokens")
    assert accuracy >= 0.6 and top20 >= 0.95


def test_two_builds_of_one_path_take_turns_and_the_second_finds_it_built(tmp_path):
    """Two jobs (or test processes) asking for the same model at once: one builds, the other waits
    for it and then finds a current build, so nobody replaces a directory another one reads."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    out, builds, inside = tmp_path / "m", [], threading.Semaphore(1)

    def build(tmp):
        assert inside.acquire(blocking=False), "two builds of one path ran at once"
        builds.append(1)
        time.sleep(0.3)
        (tmp / "weights").write_text("w")
        (tmp / RECIPE_FILE).write_text(json.dumps({"recipe": "r"}))
        inside.release()

    def current():
        return (out / "weights").exists()

    with ThreadPoolExecutor(2) as pool:
        built = list(pool.map(lambda _: models.replace_build(out, build, setting="x", current=current), range(2)))
    assert sorted(built) == [False, True] and len(builds) == 1 and (out / "weights").read_text() == "w"
