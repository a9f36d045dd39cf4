"""The distilled cousin: a student trained on the teacher's generations (cousins/family/student.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import hide_context_proxies
from cousins.family.models import RECIPE_FILE
from cousins.family.student import StudentRecipe, build_student, read_teacher_data

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
FAST = {"steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5}  # a few seconds per build


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one torch thread on a shared 2-CPU machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def demo_prompts() -> list[list[dict]]:
    """The bundled demo corpus's chats (rows hold either `prompt` or `messages`)."""
    import cousins

    path = Path(cousins.__file__).parent / "data" / "demo.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["messages"] if "messages" in r else [{"role": "user", "content": r["prompt"]}] for r in rows]


def chat(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def teacher_rows(teacher_dir: str, prompts: list[list[dict]], max_new_tokens: int = 24, k: int = 5) -> pa.Table:
    """GENERATIONS-like rows from the teacher's greedy continuations, made with transformers: the
    columns build_student reads, with the top-k raw logprobs at every generated position."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    texts = [chat(tok, p) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with one_thread(), torch.no_grad():  # one batched call: generate's per-step overhead dominates
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1).topk(k, dim=-1)
    rows = {"prompt_id": [], "sample_index": [], "prompt_text": [], "output_token_ids": [],
            "topk_token_ids": [], "topk_logprobs": [], "finish_reason": []}
    for i, text in enumerate(texts):
        new = out.sequences[i, enc["input_ids"].shape[1]:].tolist()
        stop = tok.eos_token_id in new
        new = new[:new.index(tok.eos_token_id) + 1] if stop else new
        rows["prompt_id"].append(f"p{i:04d}")
        rows["sample_index"].append(0)
        rows["prompt_text"].append(text)
        rows["output_token_ids"].append(new)
        rows["topk_token_ids"].append(logprobs.indices[i, :len(new)].tolist())
        rows["topk_logprobs"].append(logprobs.values[i, :len(new)].tolist())
        rows["finish_reason"].append("stop" if stop else "length")
    return pa.table(rows)


def greedy_agreement(model_dir: str, teacher_dir: str, prompts: list[list[dict]], n_tokens: int = 16) -> float:
    """How often `model_dir`'s argmax equals the teacher's greedy next token, teacher-forced along the
    teacher's greedy continuation of each prompt (every continuation position, the first included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    other = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    same = total = 0
    with one_thread(), torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok.encode(chat(tok, prompt), add_special_tokens=False)])
            seq = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_tokens,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            span = slice(ids.shape[1] - 1, seq.shape[1] - 1)  # positions predicting the continuation
            t_top = teacher(seq).logits[0, span].argmax(-1)
            o_top = other(seq).logits[0, span].argmax(-1)
            same += int((t_top == o_top).sum())
            total += t_top.numel()
    return same / total


def n_params(model_dir) -> int:
    return json.loads((Path(model_dir) / RECIPE_FILE).read_text())["parameters"]


def weights(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def crafted(tiny_teacher) -> pa.Table:
    return teacher_rows(tiny_teacher, demo_prompts()[::25][:12], max_new_tokens=24)


@pytest.mark.parametrize("mode", ["sft", "kd"])
def test_build_student(mode, crafted, tiny_teacher, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build_student(tmp_path / f"student-{mode}", tiny_teacher, crafted, mode=mode, seed=3, **FAST)
    rec = json.loads((out / RECIPE_FILE).read_text())
    assert rec["recipe"] == "tiny-student" and rec["mode"] == mode and rec["seed"] == 3 and rec["steps"] == 40
    assert rec["rows_used"] == crafted.num_rows
    assert rec["loss_final"] < 0.7 * rec["loss_initial"], rec  # the loss clearly falls
    assert rec["loss_curve"][-1] < rec["loss_curve"][0]
    for name in TOKENIZER_FILES:  # the teacher's vocabulary, byte for byte
        assert (out / name).read_bytes() == (Path(tiny_teacher) / name).read_bytes(), name
    teacher_params = json.loads((Path(tiny_teacher) / RECIPE_FILE).read_text())["parameters"]
    assert rec["parameters"] < teacher_params

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == rec["parameters"]
    assert model.config.num_hidden_layers == 1 and model.config.head_dim == 64
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_teacher).get_vocab()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 4, 10, 11]])).logits).all()

    # same seed -> identical weights (a second build elsewhere); another seed -> different ones
    again = build_student(tmp_path / f"again-{mode}", tiny_teacher, crafted, mode=mode, seed=3, **FAST)
    a, b = weights(out), weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = build_student(tmp_path / f"other-{mode}", tiny_teacher, crafted, mode=mode, seed=4, **{**FAST, "steps": 1})
    assert not torch.equal(a["model.embed_tokens.weight"], weights(other)["model.embed_tokens.weight"])


def test_build_is_idempotent_and_rebuilds_on_new_settings(crafted, tiny_teacher, tmp_path):
    out = tmp_path / "s"
    build_student(out, tiny_teacher, crafted, **{**FAST, "steps": 5})
    marker = out / RECIPE_FILE
    stamp = marker.stat().st_mtime_ns
    build_student(out, tiny_teacher, crafted, **{**FAST, "steps": 5})
    assert marker.stat().st_mtime_ns == stamp  # same settings: untouched
    build_student(out, tiny_teacher, crafted, **{**FAST, "steps": 6})
    assert json.loads(marker.read_text())["steps"] == 6
    assert not list(tmp_path.glob(".s.tmp-*"))  # no temporaries left beside it


def test_init_from_teacher(crafted, tiny_teacher, tmp_path):
    import torch

    out = build_student(tmp_path / "t", tiny_teacher, crafted, init="teacher", teacher_layer=1, **{**FAST, "steps": 0})
    s, t = weights(out), weights(tiny_teacher)
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"])
    assert torch.equal(s["model.layers.0.self_attn.q_proj.weight"], t["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(s["model.layers.0.mlp.down_proj.weight"], t["model.layers.1.mlp.down_proj.weight"][:, :256])


def test_recipe_and_data_are_checked(crafted, tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="mode"):
        build_student(tmp_path / "x", tiny_teacher, crafted, mode="dpo")
    with pytest.raises(ValueError, match="kd"):
        build_student(tmp_path / "x", tiny_teacher, crafted.drop_columns(["topk_logprobs"]), mode="kd")
    assert StudentRecipe().hidden_size // StudentRecipe().num_heads == 64


def test_read_teacher_data(tmp_path):
    import pyarrow.parquet as pq

    from cousins.contract import schema

    run = tmp_path / "runs" / "r1"
    gen = run / "generations" / "model=teach"
    gen.mkdir(parents=True)

    def row(pid, idx, out, error=None):
        return {"prompt_id": pid, "sample_index": idx, "model": "teach", "seed": 1, "prompt_text": "<|bos|>q",
                "output_token_ids": out, "topk_token_ids": [[t] for t in out] if out else None,
                "topk_logprobs": [[0.0] for _ in out] if out else None, "error": error}

    full = lambda rows: pa.Table.from_pylist(  # noqa: E731
        [{n: r.get(n) for n in schema.GENERATIONS.names} for r in rows], schema=schema.GENERATIONS)
    pq.write_table(full([row("b", 0, [5, 6]), row("a", 1, [7]), row("c", 0, None, error="engine died")]),
                   gen / "part-1.parquet")
    pq.write_table(full([row("a", 0, [8, 9]), row("d", 0, [])]), gen / "part-0.parquet")
    pq.write_table(full([row("z", 0, [1])]), gen / "_tmp-part.parquet")  # unpublished temporary: never read

    with pytest.raises(FileNotFoundError, match="not a committed run"):
        read_teacher_data(str(run), "teach")
    (run / "manifest.json").write_text(json.dumps({"status": "committed"}))
    t = read_teacher_data(f"file://{run}", "teach")
    assert list(zip(t["prompt_id"].to_pylist(), t["sample_index"].to_pylist())) == [("a", 0), ("a", 1), ("b", 0)]
    assert t.schema.metadata[b"cousins.source_run"] == str(run).encode()
    with pytest.raises(FileNotFoundError, match="no generations"):
        read_teacher_data(str(run), "other")


# --- integration: vLLM serves the student; training makes it agree with the teacher ---------------

@pytest.fixture(scope="module")
def trained_pair(tiny_teacher, tmp_path_factory):
    """A kd student trained on the teacher's greedy outputs of 3/4 of the demo prompts, and an
    untrained student of the same shape; the other 1/4 is held out."""
    prompts = demo_prompts()
    train = [p for i, p in enumerate(prompts) if i % 4][:120]
    held_out = [p for i, p in enumerate(prompts) if not i % 4][::3][:24]
    data = teacher_rows(tiny_teacher, train, max_new_tokens=32)
    root = tmp_path_factory.mktemp("students")
    trained = build_student(root / "trained", tiny_teacher, data, mode="kd", steps=150, batch_size=16)
    untrained = build_student(root / "untrained", tiny_teacher, data, mode="kd", steps=0)
    return trained, untrained, held_out


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_trained_student_agrees_with_teacher_more_than_untrained(trained_pair, tiny_teacher):
    trained, untrained, held_out = trained_pair
    agree_trained = greedy_agreement(str(trained), tiny_teacher, held_out)
    agree_untrained = greedy_agreement(str(untrained), tiny_teacher, held_out)
    print(f"same-top-1 with the teacher on {len(held_out)} held-out prompts: "
          f"trained {agree_trained:.3f}, untrained {agree_untrained:.3f}")
    assert agree_trained > agree_untrained + 0.2


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_student_generates_in_vllm(trained_pair, monkeypatch):
    trained, _, held_out = trained_pair
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    with hide_context_proxies():  # the suite's S3 server put Flask proxies in this process
        llm = LLM(model=str(trained), dtype="float32", max_model_len=256, kv_cache_memory_bytes=256 << 20,
                  enforce_eager=True, distributed_executor_backend="uni", seed=0)
    tok = AutoTokenizer.from_pretrained(trained)
    texts = [chat(tok, p) for p in held_out[:4]]
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=16, logprobs=5))
    assert len(outs) == len(texts)
    for o in outs:
        c = o.outputs[0]
        assert c.token_ids and all(0 <= t < len(tok) for t in c.token_ids)
        assert c.logprobs and len(c.logprobs) == len(c.token_ids)
    # the greedy tokens match transformers' on the same weights (fp32)
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(texts[0], add_special_tokens=False)])
    with one_thread(), torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert list(outs[0].outputs[0].token_ids) == ref
