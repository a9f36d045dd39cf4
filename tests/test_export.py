"""Distillation exports: each filter on crafted rows, MinHash near-duplicates, and an export of a
committed run read back through `datasets`, pyarrow and DuckDB."""

from __future__ import annotations

import json
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cousins.contract import schema
from cousins.export.config import KD, SFT, ExportConfig, ExportError, FiltersConfig
from cousins.export.filters import apply_filters
from export_reference import near_duplicates
from cousins.export.write import export
from cousins.run.layout import RunLayout
from cousins.run.storage import mark_done, resolve

TEACHER = "teach"


def _gen(pid, i, text, *, tokens=None, finish="stop", error=None, lps=None, k=3):
    n = tokens if tokens is not None else max(1, len(text.split()))
    ids = list(range(10, 10 + n))
    return {"prompt_id": pid, "sample_index": i, "model": TEACHER, "seed": 7, "category": "c",
            "prompt_text": f"<|user|>{pid}<|assistant|>", "output_text": None if error else text,
            "output_token_ids": None if error else ids,
            "output_logprobs": None if error else (lps or [-0.5] * n),
            "topk_token_ids": None if error else [[t, t + 1, t + 2][:k] for t in ids],
            "topk_logprobs": None if error else [[-0.5, -1.5, -2.5][:k] for _ in ids],
            "finish_reason": None if error else finish, "prompt_tokens": 4, "output_tokens": None if error else n,
            "engine_time_s": 0.01, "engine_node": "n", "error": error}


def _table(rows):
    t = pa.Table.from_pylist(rows, schema=schema.GENERATIONS)
    keys = [f"prompt {p}" for p in t.column("prompt_id").to_pylist()]
    t = t.append_column("prompt_key", pa.array(keys))
    lps = t.column("output_logprobs").to_pylist()
    return t.append_column("mean_logprob", pa.array([sum(x) / len(x) if x else None for x in lps], pa.float64()))


def _names(t):
    return [(r["prompt_id"], r["sample_index"]) for r in t.select(["prompt_id", "sample_index"]).to_pylist()]


def _dropped(reports):
    return {r.name: r.dropped for r in reports}


def test_errors_truncation_and_length_filters():
    t = _table([_gen("a", 0, "fine answer"), _gen("a", 1, "x", error="boom"), _gen("b", 0, "cut off", finish="length"),
                _gen("c", 0, "one two three four five six", tokens=6), _gen("d", 0, "", tokens=0)])
    kept, rep = apply_filters(t, FiltersConfig(max_output_tokens=5, exact_dedup=False), {})
    assert _names(kept) == [("a", 0)]
    assert _dropped(rep) == {"generation errors": 1, "truncated (length)": 1, "output length": 2}
    kept, _ = apply_filters(t, FiltersConfig(drop_truncated=False, min_output_tokens=0, exact_dedup=False), {})
    assert ("b", 0) in _names(kept) and ("d", 0) in _names(kept)


def test_answer_check_contains_exact_and_regex_apply_to_labelled_prompts_only():
    t = _table([_gen("p1", 0, "The answer is 42."), _gen("p1", 1, "It is 41."), _gen("p2", 0, "no reference here")])
    refs = {"p1": "42"}
    kept, rep = apply_filters(t, FiltersConfig(answer_check="contains", exact_dedup=False), refs)
    assert _names(kept) == [("p1", 0), ("p2", 0)] and _dropped(rep)["answer check"] == 1
    kept, _ = apply_filters(t, FiltersConfig(answer_check="exact", exact_dedup=False), refs)
    assert _names(kept) == [("p2", 0)]
    kept, _ = apply_filters(t, FiltersConfig(answer_check="regex", answer_regex=r"answer is (\d+)",
                                             exact_dedup=False), refs)
    assert _names(kept) == [("p1", 0), ("p2", 0)]


def test_exact_dedup_ignores_case_and_whitespace_within_a_prompt():
    t = _table([_gen("a", 0, "Same  answer"), _gen("a", 1, "same answer"), _gen("b", 0, "same answer")])
    kept, rep = apply_filters(t, FiltersConfig(), {})
    assert _names(kept) == [("a", 0), ("b", 0)] and _dropped(rep)["exact duplicates"] == 1


def test_minhash_finds_planted_near_duplicates_and_keeps_distinct_texts():
    base = ("the quick brown fox jumps over the lazy dog while the farmer watches from the old "
            "wooden fence near the red barn at the end of a long summer day")
    texts = [base, base.replace("lazy", "sleepy"), "completely different words about ships sailing on a grey sea "
             "under heavy clouds with gulls crying above the harbour walls and fishing boats",
             base + " indeed", "a short unrelated line"]
    dup = near_duplicates(texts, threshold=0.7)
    assert dup == [False, True, False, True, False]


def test_best_of_n_keeps_one_row_per_prompt_by_the_chosen_field():
    t = _table([_gen("a", 0, "x y", lps=[-2.0, -2.0]), _gen("a", 1, "x z", lps=[-0.1, -0.3]),
                _gen("b", 0, "one", tokens=1), _gen("b", 1, "one two three", tokens=3)])
    kept, rep = apply_filters(t, FiltersConfig(best_of_n="mean_logprob"), {})
    assert ("a", 1) in _names(kept) and _dropped(rep)["best-of-n"] == 2
    kept, _ = apply_filters(t, FiltersConfig(best_of_n="-output_tokens"), {})
    assert ("b", 0) in _names(kept)


# --- exporting a committed run --------------------------------------------------------------------

def _committed_run(root, run_id="r1", commit=True):
    layout = RunLayout(resolve(str(root)), run_id)
    prompts = [{"prompt_id": f"p{i}", "messages": [{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": f"q{i}"}],
                "category": "c", "reference": "42" if i < 3 else None, "source": "x.jsonl", "source_row": i}
               for i in range(6)]
    layout.run.fs.makedirs(layout.prompts.path, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(prompts, schema=schema.PROMPTS), f"{layout.prompts.path}/part-0.parquet")
    mark_done(layout.prompts, {"rows": 6})
    gens = [_gen(f"p{i}", s, f"answer {i} is 42" if s == 0 else f"answer {i} is {40 + s}") for i in range(6)
            for s in range(2)]
    gens[3] = _gen("p1", 1, "x", error="engine failed")
    gdir = layout.generations(TEACHER)
    gdir.fs.makedirs(gdir.path, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(gens[:6], schema=schema.GENERATIONS), f"{gdir.path}/part-a.parquet")
    pq.write_table(pa.Table.from_pylist(gens[6:], schema=schema.GENERATIONS), f"{gdir.path}/part-b.parquet")
    mark_done(gdir, {})
    layout.config.write_text_atomic(yaml.safe_dump({"model": {"name": TEACHER}}))
    if commit:
        layout.manifest.write_json_atomic({
            "run_id": run_id, "status": "committed", "committed": "2026-11-22T00:00:00+00:00", "config_hash": "abc",
            "versions": {"cousins": "0.1.0"}, "models": [{"name": TEACHER, "path": "/m/teach", "fingerprint": "f00",
                                                           "dtype": "float32", "quantization": None}],
            "corpus": {"path": "x.jsonl", "prompts": 6}, "sampling": {"temperature": 0.8, "logprobs": 3},
            "samples": 2, "seed": 0, "seed_rule": "sha256"})
    return layout


@pytest.mark.integration
def test_export_round_trips_through_datasets_pyarrow_and_duckdb(ray_local, tmp_path):
    import datasets
    import duckdb
    import pyarrow.dataset as pads

    _committed_run(tmp_path)
    cfg = ExportConfig(run_id="r1", kd=True, rows_per_file=4,
                       filters=FiltersConfig(answer_check="contains"))
    cfg.storage.root = str(tmp_path)
    result = export(cfg)
    out = tmp_path / "runs" / "r1" / "distill" / "kd"
    # 12 rows: 1 error; p0..p2 labelled: the sample-1 answers (41, 42→ p1's error, 43) fail the check
    assert {r.name: r.dropped for r in result.filters} == {
        "generation errors": 1, "truncated (length)": 0, "output length": 0, "answer check": 2, "exact duplicates": 0}
    # files of at most rows_per_file rows, one partition's each (partitions of about that many rows)
    assert result.rows_out == 9 and sum(f["rows"] for f in result.files) == 9
    assert all(1 <= f["rows"] <= 4 for f in result.files) and len(result.files) >= 3
    ds = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train")
    assert ds.num_rows == 9 and ds[0]["messages"][-1]["role"] == "assistant"
    assert ds[0]["messages"][0] == {"role": "system", "content": "be brief"}
    table = pads.dataset(str(out), format="parquet", exclude_invalid_files=True).to_table()
    assert table.schema.equals(KD) and table.num_rows == 9
    assert all(len(ids) == len(k) for ids, k in zip(table.column("token_ids").to_pylist(),
                                                     table.column("topk_token_ids").to_pylist()))
    n = duckdb.sql(f"select count(*), sum(output_tokens) from read_parquet('{out}/*.parquet')").fetchall()[0]
    assert n == (9, result.output_tokens)
    card = (out / "README.md").read_text()
    for needle in ("run `r1`", "fingerprint `f00`", "answer check", "| answer check | 11 | 2 |", "top-3 logprobs"):
        assert needle in card, needle
    assert result.bytes_per_output_token == pytest.approx(sum(f["bytes"] for f in result.files) / result.output_tokens)
    from cousins.contract import codec, records

    marker = json.loads((out / "_SUCCESS").read_text())  # the export's marker reads back as declared
    assert codec.encode(codec.decode(records.ExportDone, marker)) == marker and marker["rows"] == 9


@pytest.mark.integration
def test_sft_export_as_jsonl(ray_local, tmp_path):
    import datasets

    _committed_run(tmp_path)
    cfg = ExportConfig(run_id="r1", format="jsonl", out=str(tmp_path / "sft"))
    cfg.storage.root = str(tmp_path)
    result = export(cfg)
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "sft" / "*.jsonl"), split="train")
    assert ds.num_rows == result.rows_out == 11 and set(ds.column_names) == set(SFT.names)


def test_export_refuses_unknown_and_uncommitted_runs_and_names_available_fields(tmp_path):
    _committed_run(tmp_path, "open", commit=False)
    _committed_run(tmp_path, "done")
    cfg = ExportConfig(run_id="nope")
    cfg.storage.root = str(tmp_path)
    with pytest.raises(ExportError, match="unknown run 'nope'"):
        export(cfg)
    cfg.run_id = "open"
    with pytest.raises(ExportError, match="not committed"):
        export(cfg)
    cfg.run_id, cfg.filters.best_of_n = "done", "reward"
    with pytest.raises(ExportError, match=r"no field 'reward'; available fields: .*mean_logprob.*output_tokens"):
        export(cfg)
    cfg.filters.best_of_n, cfg.model = None, "student"
    with pytest.raises(ExportError, match="no model 'student'; models: teach"):
        export(cfg)


def test_accounting_properties_add_up():
    from cousins.contract.codec import encode
    from cousins.contract.records import ModelStats

    s = ModelStats(model="m", prompts=10, samples=2, rows=20, error_rows=2, prompt_tokens=100, output_tokens=900,
                   wall_s=30.0, engine_s=20.0, new_rows=20, new_output_tokens=900, accelerator="gpu",
                   accelerator_s=60.0, price_per_accelerator_hour=3.6, labelled_rows=8, correct_rows=4,
                   labelled_output_tokens=400)
    a = encode(s.accounting())
    assert a["tokens_per_prompt"] == pytest.approx(900 / 18)
    assert a["tokens_per_correct"] == pytest.approx(100.0)
    assert a["cost_per_1m_output_tokens"] == pytest.approx(3.6 * 60 / 3600 / 900 * 1e6)
    assert math.isclose(a["tokens_per_s"], 30.0)
    assert json.dumps(a)  # plain data for summary.json and the manifest


def _planted_run(root, run_id="dups"):
    """40 prompts x 3 samples: prompts 20-39 repeat the messages of 0-19 (exact duplicates across
    prompt ids), near-duplicate answers planted across prompts, varied logprobs for best-of-n."""
    layout = _committed_run(root, run_id)
    base = ("the quick brown fox jumps over the lazy dog while the farmer watches from the old wooden "
            "fence near the red barn at the end of a long summer day").split()
    prompts, gens = [], []
    for i in range(40):
        prompts.append({"prompt_id": f"q{i:02d}", "messages": [{"role": "user", "content": f"question {i % 20}"}],
                        "category": "c", "reference": "42" if i % 4 == 0 else None, "source": "x", "source_row": i})
        for s in range(3):
            if s == 2 and i % 5 == 0:  # a near-duplicate of a text shared across prompts
                words = base[:-1] + [f"day{i % 2}"]
            else:
                words = [f"w{(i % 20) * 7 + s * 3 + k}" for k in range(12)] + (["is", "42"] if s == 0 else [])
            gens.append(_gen(f"q{i:02d}", s, " ".join(words), lps=[-0.1 * (1 + (i + s) % 4)] * len(words)))
    for stage in (layout.prompts, layout.generations(TEACHER)):
        shutil.rmtree(stage.path, ignore_errors=True)  # the test's own run, rewritten
        stage.fs.makedirs(stage.path, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(prompts, schema=schema.PROMPTS), f"{layout.prompts.path}/part-0.parquet")
    mark_done(layout.prompts, {"rows": 40})
    g = layout.generations(TEACHER)
    for k in range(4):
        pq.write_table(pa.Table.from_pylist(gens[k::4], schema=schema.GENERATIONS), f"{g.path}/part-{k}.parquet")
    mark_done(g, {})
    return prompts, gens


@pytest.mark.integration
def test_the_filters_across_partitions_keep_what_they_keep_on_one_table(ray_local, tmp_path, monkeypatch):
    """Exact dedup by content across prompt ids, LSH near dedup across prompts, the answer check and
    best-of-n as Dataset operations over several partitions: the rows kept and every count equal
    the same steps on one in-memory table."""
    import cousins.run.dataops

    monkeypatch.setattr(cousins.run.dataops, "SMALL_ROWS", 0)  # several partitions, though the run is small
    prompts, gens = _planted_run(tmp_path)
    filters = FiltersConfig(answer_check="contains", near_dedup=True, near_dedup_threshold=0.7,
                            best_of_n="mean_logprob")
    cfg = ExportConfig(run_id="dups", filters=filters, rows_per_file=7)
    cfg.storage.root = str(tmp_path)
    result = export(cfg)
    keys = {p["prompt_id"]: json.dumps(p["messages"], sort_keys=True) for p in prompts}
    t = _table(gens)
    t = t.set_column(t.schema.get_field_index("prompt_key"), "prompt_key",
                     pa.array([keys[p] for p in t.column("prompt_id").to_pylist()]))
    kept, want = apply_filters(t, filters, {p["prompt_id"]: p["reference"] for p in prompts if p["reference"]})
    assert [(r.name, r.before, r.dropped) for r in result.filters] == [(r.name, r.before, r.dropped) for r in want]
    assert _dropped(want)["exact duplicates"] > 0 and _dropped(want)["near duplicates"] > 0
    assert _dropped(want)["answer check"] > 0 and _dropped(want)["best-of-n"] > 0
    out = pa.concat_tables([pq.read_table(tmp_path / "runs" / "dups" / "distill" / "sft" / f["name"])
                            for f in result.files])
    assert sorted(_names(out)) == sorted(_names(kept)) and result.rows_out == kept.num_rows
    assert len(result.files) >= 2 and all(f["rows"] <= 7 for f in result.files)


def test_node_slots_interleave_nodes_by_their_cpus(monkeypatch):
    import ray

    from cousins.run.dataops import node_slots

    nodes = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 3.0}},
             {"NodeID": "head", "Alive": True, "Resources": {"memory": 1.0}},  # no CPU: never chosen
             {"NodeID": "b", "Alive": True, "Resources": {"CPU": 2.0}},
             {"NodeID": "dead", "Alive": False, "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert node_slots(1.0) == ["a", "b", "a", "b", "a"]
    assert node_slots(2.0) == ["a", "b"]
    assert node_slots(4.0) == [None, None]  # none fits yet: unplaced, the demand scales the cluster


def _keys_of(table: pa.Table) -> pa.Table:
    return pa.table({"keys": [sorted(table.column("k").to_pylist())]})


def test_spread_blocks_runs_each_partition_once(ray_local):
    """Every non-empty partition of a key-partitioned Dataset reaches the function once, whole."""
    import ray

    from cousins.run.dataops import spread_blocks

    ds = ray.data.from_items([{"k": i % 37, "v": i} for i in range(500)]).repartition(8, keys=["k"])
    results = list(spread_blocks(ds, _keys_of, num_cpus=1, fn_kwargs={}))
    parts = [r.column("keys")[0].as_py() for r in results]
    seen = [k for p in parts for k in set(p)]
    assert sorted(seen) == list(range(37))  # each key in exactly one partition's result
    assert sum(len(p) for p in parts) == 500 and len(parts) <= 8
