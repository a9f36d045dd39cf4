"""Exact KLD at a real vocabulary: what one output token costs with both models, by hidden states (the
`hidden` route), by vLLM's full-vocabulary lists (the `lists` route) and, for scale, top-k scoring.

    PYTHONPATH=. .venv/bin/python -m cousins.bench.kld               # ~3 minutes on 2 cores
    PYTHONPATH=. .venv/bin/python -m cousins.bench.kld --hidden-size 896 --rows 2

Two random-weights 1-layer Llamas (built under /tmp with transformers, no download) with heads of
152,064 and 151,936 rows (the Qwen2.5-7B / 1.5B case), compared over a 151,665-token vocabulary
(ids past it one tail bucket). Each route runs the functions the exact-KLD actor runs
(cousins/engine/kld_actor.py), on one in-process engine per model:
- hidden: both models' pooling engines return every position's final hidden state; each model's
  head is applied at the output's positions and reduced on tensors (cousins/engine/head.py);
- lists: both engines return every position's full-vocabulary logprobs (`prompt_logprobs=-1`, flat
  lists), reduced by cousins/drift/vocab_kld.py;
- top-k: both engines score the same rows with `prompt_logprobs=20` (what drift.kld=topk stores),
  their top-20 lists at the output's positions read into arrays.
Rows are `--rows` sequences of `--prompt` + `--output` tokens; times are per output token (each
route's fastest of `--repeats` alternated runs: this machine is shared), memory the route's peak
RSS over its start (the kernel's high-water mark, reset per step through /proc/self/clear_refs),
per output token and at two output lengths (a route whose memory does not grow with the vocabulary
holds the same few MiB whatever the output's length). Prints one JSON object, then a last line
`exact_over_topk=R speedup_over_lists=S` (R: hidden over top-k, S: lists over hidden).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time

import numpy as np

VOCAB, WIDTH_P, WIDTH_Q = 151_665, 152_064, 151_936
TOPK = 20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measured(fn, *args):
    """(result, seconds, peak RSS over the start in bytes)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status("VmRSS:")
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0, _status("VmHWM:") - base


def random_model(path: str, width: int, hidden: int, seed: int) -> str:
    """A random-weights 1-layer Llama with a `width`-row head, the tiny teacher's tokenizer files
    (ids past its 2,048 entries are never fed; the head's rows all take part)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=width, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=max(2, hidden // 64), num_key_value_heads=max(2, hidden // 64),
                      max_position_embeddings=1024,
                      tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # sharper than random init's near-uniform distributions
    model.save_pretrained(path)
    teacher = os.path.join(os.path.dirname(__file__), "..", "..", "models", "tiny-teacher")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(teacher, name), path)
    return path


def _spec(name: str, path: str, rows: int, length: int):
    from cousins.engine.backend import EngineSpec

    return EngineSpec(model_name=name, model_path=path, dtype="float32", quantization=None, max_model_len=length + 8,
                      kv_cache_bytes=256 << 20, tensor_parallel_size=1, max_num_seqs=rows, enforce_eager=True,
                      max_logprobs=TOPK)


def route_hidden(engines, heads, prompts, start: int, n: int):
    from cousins.engine.backend import hidden_states
    from cousins.engine.head import exact_rows

    hp, hq = hidden_states(engines[0], prompts), hidden_states(engines[1], prompts)
    at = slice(start - 1, start - 1 + n)  # the states that predict the output's tokens
    return [e.kld for e in exact_rows([p[at] for p in hp], [q[at] for q in hq], *heads, VOCAB)]


def route_lists(engines, params, prompts, start: int, n: int):
    from cousins.drift.vocab_kld import exact_kld

    outs = [e.generate(prompts, params, use_tqdm=False) for e in engines]
    return [exact_kld(p.prompt_logprobs, q.prompt_logprobs, start, n, VOCAB).kld for p, q in zip(*outs)]


def route_topk(engines, params, prompts, start: int, n: int):
    """Both models' top-k lists at the output's positions as (ids, logprobs) arrays, as scoring keeps them."""
    out = []
    for e in engines:
        for o in e.generate(prompts, params, use_tqdm=False):
            f = o.prompt_logprobs
            s, t = f.start_indices[start:start + n], f.end_indices[start:start + n]
            out.append((np.asarray([f.token_ids[a + 1:b] for a, b in zip(s, t)], np.int64),
                        np.asarray([f.logprobs[a + 1:b] for a, b in zip(s, t)], np.float32)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--output", type=int, default=48)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", default="/tmp/cousins-bench-kld")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, as on CPU
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from cousins.engine.backend import VllmBackend
    from cousins.engine.kld_actor import full_spec, hidden_spec

    paths = [random_model(os.path.join(a.models, f"h{a.hidden_size}-{w}"), w, a.hidden_size, seed)
             for seed, w in enumerate((WIDTH_P, WIDTH_Q))]
    length = a.prompt + a.output
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(3, 2000, length).tolist()} for _ in range(a.rows)]
    tokens = a.rows * a.output
    backend = VllmBackend()
    t0 = time.perf_counter()
    pooled = [backend.load(hidden_spec(_spec(f"m{i}", p, a.rows, length))) for i, p in enumerate(paths)]
    heads = [backend.head(e, None) for e in pooled]
    listed = [backend.load(full_spec(_spec(f"m{i}", p, a.rows, length))) for i, p in enumerate(paths)]
    load_s = time.perf_counter() - t0
    full = backend.params(max_tokens=1, temperature=0.0, prompt_logprobs=-1, detokenize=False, flat_logprobs=True)
    topk = backend.params(max_tokens=1, temperature=0.0, prompt_logprobs=TOPK, detokenize=False, flat_logprobs=True)
    steps = {"hidden": lambda ps, n: route_hidden(pooled, heads, ps, a.prompt, n),
             "lists": lambda ps, n: route_lists(listed, full, ps, a.prompt, n),
             "topk": lambda ps, n: route_topk(listed, topk, ps, a.prompt, n)}
    for step in steps.values():  # warm: each engine's first call of its kind pays one-off costs
        step(prompts[:1], a.output)
    runs = {k: [] for k in steps}
    for _ in range(a.repeats):
        for k, step in steps.items():
            runs[k].append(measured(step, prompts, a.output))
    best = {k: min(v, key=lambda m: m[1]) for k, v in runs.items()}
    peak = {k: max(m[2] for m in v) for k, v in runs.items()}
    # memory at a quarter of the output: what does not grow with the output is per chunk, not per position
    short = max(1, a.output // 4)
    short_peak = {k: measured(steps[k], [{"prompt_token_ids": p["prompt_token_ids"][:a.prompt + short]}
                                         for p in prompts], short)[2] for k in ("hidden", "lists")}
    new, old = np.concatenate(best["hidden"][0]), np.concatenate(best["lists"][0])
    ms = {k: 1e3 * best[k][1] / tokens for k in steps}
    out = {"rows": a.rows, "prompt_tokens": a.prompt, "output_tokens": a.output, "hidden_size": a.hidden_size,
           "vocab": VOCAB, "head_widths": [WIDTH_P, WIDTH_Q], "engines_load_s": load_s,
           "ms_per_output_token": ms,
           "ms_per_output_token_all": {k: [1e3 * m[1] / tokens for m in v] for k, v in runs.items()},
           "peak_rss_mib": {k: v / 2**20 for k, v in peak.items()},
           "peak_rss_mib_per_output_token": {k: v / 2**20 / tokens for k, v in peak.items()},
           f"peak_rss_mib_at_{short}_output_tokens": {k: v / 2**20 for k, v in short_peak.items()},
           "hidden_vs_lists_kld_max_abs_diff": float(np.abs(new - old).max()),
           "kld_mean": float(old.mean())}
    print(json.dumps(out, indent=1))
    print(f"exact_over_topk={ms['hidden'] / ms['topk']:.2f} speedup_over_lists={ms['lists'] / ms['hidden']:.1f}")


if __name__ == "__main__":
    main()
