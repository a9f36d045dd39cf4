"""Exact KLD at a real vocabulary: what the reduction costs per token, before and after
cousins/drift/vocab_kld.py, and what vLLM itself costs to hand over full-vocabulary logprobs.

    PYTHONPATH=. .venv/bin/python -m cousins.bench.kld                 # the reduction, synthetic data
    PYTHONPATH=. .venv/bin/python -m cousins.bench.kld --vllm          # + real vLLM, random-weights model

Synthetic data has vLLM's FlatLogprobs layout (Python lists; per position the position's token
first, then every id of the head in rank order) for two heads of 152,064 and 151,936 rows (the
Qwen2.5-7B / 1.5B case) over a tokenizer of 151,665 entries. `--vllm` builds a random-weights
Llama of that vocabulary with a tiny hidden size under /tmp (transformers, no download) and runs
one in-process engine with prompt_logprobs=-1 against the same prompts without them.
Memory is each step's peak RSS over its start (the kernel's high-water mark, reset between steps
through /proc/self/clear_refs), time per token the step's wall time over its positions. Prints
one JSON object (docs/benchmarks.md, "Exact KLD at a 152k vocabulary").
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import numpy as np

VOCAB, WIDTH_P, WIDTH_Q = 151_665, 152_064, 151_936


# --- the reduction as it was (kept here for the comparison, not in the package) ------------------

def legacy_position_kld(p_ids, p_lps, q_ids, q_lps) -> float:
    p_ids, q_ids = np.asarray(p_ids, np.int64), np.asarray(q_ids, np.int64)
    v = int(max(p_ids.max(initial=-1), q_ids.max(initial=-1))) + 1
    lp, lq = np.full(v, -np.inf), np.full(v, -np.inf)
    lp[p_ids], lq[q_ids] = np.asarray(p_lps, np.float64), np.asarray(q_lps, np.float64)
    keep = np.isfinite(lp)
    return float(max(0.0, (np.exp(lp[keep]) * (lp[keep] - lq[keep])).sum()))


def legacy_positions(f, start: int, n: int):
    for t in range(start, start + n):
        a, b = f.start_indices[t], f.end_indices[t]
        yield f.token_ids[a:b], f.logprobs[a:b]


def legacy(p, q, start: int, n: int) -> list[float]:
    return [legacy_position_kld(pi, pl, qi, ql) for (pi, pl), (qi, ql) in
            zip(legacy_positions(p, start, n), legacy_positions(q, start, n))]


# --- measurement -------------------------------------------------------------------------------------

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measured(fn, *args):
    """(result, seconds, peak RSS over the start in bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status("VmRSS:")
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0, _status("VmHWM:") - base


def synthetic(positions: int, width: int, seed: int, shift: np.ndarray | None = None) -> SimpleNamespace:
    """FlatLogprobs-like lists of `positions` positions over a head `width` wide (position 0
    empty, as a prompt's first token is)."""
    rng = np.random.default_rng(seed)
    f = SimpleNamespace(start_indices=[0], end_indices=[0], token_ids=[], logprobs=[])
    for t in range(positions):
        x = rng.normal(0, 3, width) if shift is None else shift[t, :width] + rng.normal(0, 0.3, width)
        x[VOCAB:] -= 12  # padded rows: trained away, a little mass left
        lp = (x - x.max() - np.log(np.exp(x - x.max()).sum())).astype(np.float32)
        order = np.argsort(-lp, kind="stable")
        tok = int(rng.integers(0, VOCAB))
        f.start_indices.append(len(f.logprobs))
        f.token_ids += [tok, *order.tolist()]
        f.logprobs += [float(lp[tok]), *lp[order].astype(np.float64).tolist()]
        f.end_indices.append(len(f.logprobs))
    return f


def bench_reduction(positions: int, chunk_cells: int, repeats: int) -> dict:
    from cousins.drift.vocab_kld import exact_kld

    base = np.random.default_rng(0).normal(0, 3, (positions, WIDTH_P))
    (p, q), build_s, build_rss = measured(lambda: (synthetic(positions, WIDTH_P, 1, base),
                                                   synthetic(positions, WIDTH_Q, 2, base)))
    runs = [(measured(legacy, p, q, 1, positions), measured(exact_kld, p, q, 1, positions, VOCAB, chunk_cells))
            for _ in range(repeats)]  # alternated, the fastest of each kept: this machine is shared
    (old, old_s, old_rss), (new, new_s, new_rss) = (min((r[i] for r in runs), key=lambda m: m[1]) for i in (0, 1))
    old_rss, new_rss = (max(r[i][2] for r in runs) for i in (0, 1))  # peaks: the largest seen
    return {
        "positions": positions, "vocab": VOCAB, "head_widths": [WIDTH_P, WIDTH_Q], "chunk_cells": chunk_cells,
        "repeats": repeats, "before_ms_per_token_all": [1e3 * r[0][1] / positions for r in runs],
        "after_ms_per_token_all": [1e3 * r[1][1] / positions for r in runs],
        "flat_lists_bytes_per_position_both_models": build_rss / positions,
        "before_ms_per_token": 1e3 * old_s / positions, "before_peak_rss_mib": old_rss / 2**20,
        "before_finite_tokens": int(np.isfinite(old).sum()),
        "after_ms_per_token": 1e3 * new_s / positions, "after_peak_rss_mib": new_rss / 2**20,
        "after_finite_tokens": int(np.isfinite(new.kld).sum()), "after_kld_mean": float(new.kld.mean()),
        "after_tail_mass_mean": float(new.tail_mass.mean()),
    }


def random_model(path: str, vocab: int = WIDTH_P, hidden: int = 64) -> str:
    """A random-weights 1-layer Llama with a `vocab`-wide head, the tiny teacher's tokenizer files."""
    import os
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, torch_dtype="float32")
    LlamaForCausalLM(cfg).save_pretrained(path)
    teacher = os.path.join(os.path.dirname(__file__), "..", "..", "models", "tiny-teacher")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(teacher, name), path)
    return path


def bench_vllm(positions: int, rows: int, path: str) -> dict:
    from cousins.drift.vocab_kld import exact_kld
    from cousins.engine.backend import EngineSpec, VllmBackend
    from cousins.engine.kld_actor import full_spec

    spec = full_spec(EngineSpec(model_name="random-152k", model_path=random_model(path), dtype="float32",
                                quantization=None, max_model_len=positions + 8, kv_cache_bytes=256 << 20,
                                tensor_parallel_size=1, max_num_seqs=rows, enforce_eager=True, max_logprobs=20))
    backend = VllmBackend()
    llm = backend.load(spec)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(3, 2000, positions + 1).tolist()} for _ in range(rows)]
    plain = backend.params(max_tokens=1, temperature=0.0, detokenize=False)
    full = backend.params(max_tokens=1, temperature=0.0, prompt_logprobs=-1, detokenize=False, flat_logprobs=True)
    llm.generate(prompts[:1], full, use_tqdm=False)  # warm
    _, plain_s, _ = measured(lambda: llm.generate(prompts, plain, use_tqdm=False))
    outs, full_s, full_rss = measured(lambda: llm.generate(prompts, full, use_tqdm=False))
    tokens = rows * positions
    _, red_s, red_rss = measured(lambda: [exact_kld(o.prompt_logprobs, o.prompt_logprobs, 1, positions, VOCAB)
                                          for o in outs])
    return {"rows": rows, "positions_per_row": positions, "head_width": WIDTH_P,
            "forward_only_ms_per_token": 1e3 * plain_s / tokens,
            "full_vocab_logprobs_ms_per_token": 1e3 * full_s / tokens,
            "full_vocab_logprobs_extra_ms_per_token": 1e3 * (full_s - plain_s) / tokens,
            "full_vocab_logprobs_rss_mib_per_token": full_rss / 2**20 / tokens,
            "reduction_ms_per_token_same_outputs": 1e3 * red_s / tokens,
            "reduction_peak_rss_mib": red_rss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=24)
    ap.add_argument("--chunk-cells", type=int, default=None, help="default: vocab_kld.CHUNK_CELLS")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm", action="store_true")
    ap.add_argument("--vllm-rows", type=int, default=4)
    ap.add_argument("--vllm-positions", type=int, default=32)
    ap.add_argument("--model", default="/tmp/cousins-random-152k")
    a = ap.parse_args()
    from cousins.drift.vocab_kld import CHUNK_CELLS

    out = {"reduction": bench_reduction(a.positions, a.chunk_cells or CHUNK_CELLS, a.repeats)}
    if a.vllm:
        out["vllm"] = bench_vllm(a.vllm_positions, a.vllm_rows, a.model)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
