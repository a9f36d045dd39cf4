"""A run's life (cousins/run/lifecycle.py): identity, open/resume/refuse, stages verified, committed runs
found the one way; storage helpers and the job's table (no Ray, no engine)."""

import pyarrow as pa
import pytest

from conftest import compose
from cousins.contract.config import to_config
from cousins.contract.redact import redacted
from cousins.orchestrate.accounting import RunResult, summary_table
from cousins.orchestrate.pipeline import open_run
from cousins.contract.records import GenerationsDone, ModelStats, PromptsDone
from cousins.run.lifecycle import (NotCommitted, RunConflict, RunState, StageIncomplete, committed, committed_at,
                                   config_diff, config_hash)
from cousins.run.runtime import forwarded_env, root_cause
from cousins.contract import schema
from cousins.run.layout import RunLayout, part_files
from cousins.run.storage import is_done, mark_done, parquet_bytes, resolve, write_parquet_atomic


def test_parquet_parts_are_published_whole_and_temporaries_are_never_data(tmp_path):
    loc = resolve(str(tmp_path / "stage"))
    write_parquet_atomic(pa.table({"x": [1, 2]}), loc.join("part-a.parquet"))
    (tmp_path / "stage" / "_tmp").mkdir(exist_ok=True)
    (tmp_path / "stage" / "_tmp" / "part-b.parquet.123").write_bytes(b"half a file")
    (tmp_path / "stage" / ".hidden.parquet").write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in part_files(loc)] == ["part-a.parquet"]
    assert not is_done(loc)
    mark_done(loc, {"rows": 2})
    assert is_done(loc) and part_files(loc) == [str(tmp_path / "stage" / "part-a.parquet")]


def test_logprob_columns_are_stored_byte_stream_split_losslessly_and_smaller():
    """Top-k logprobs (the bulk of a KD run) go BYTE_STREAM_SPLIT without a dictionary; the
    file reads back equal, other columns keep their dictionary, and it is smaller than the
    writer's defaults on logprob-like data."""
    import io

    import numpy as np
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n, k, length = 64, 20, 40
    logits = rng.normal(size=(n, length, 200)).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-logp, axis=-1)[..., :k].astype(np.int32)
    rows = {"prompt_id": [f"p{i}" for i in range(n)], "sample_index": [0] * n, "model": ["m"] * n,
            "seed": list(range(n)), "output_token_ids": [t[:, 0].tolist() for t in top],
            "output_logprobs": [np.take_along_axis(lp, t[:, :1], -1)[:, 0].tolist() for lp, t in zip(logp, top)],
            "topk_token_ids": [t.tolist() for t in top],
            "topk_logprobs": [np.take_along_axis(lp, t, -1).tolist() for lp, t in zip(logp, top)],
            "output_tokens": [length] * n}
    rows.update({c: [None] * n for c in schema.GENERATIONS.names if c not in rows})
    table = schema.conform(pa.table(rows), schema.GENERATIONS)
    data = parquet_bytes(table)
    assert pq.read_table(io.BytesIO(data)).equals(table)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0)
    enc = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "BYTE_STREAM_SPLIT" in enc["topk_logprobs.list.element.list.element"]
    assert "BYTE_STREAM_SPLIT" in enc["output_logprobs.list.element"]
    assert "RLE_DICTIONARY" not in enc["topk_logprobs.list.element.list.element"]
    assert "RLE_DICTIONARY" in enc["topk_token_ids.list.element.list.element"]
    plain = io.BytesIO()
    pq.write_table(table, plain, compression="zstd")
    assert len(data) < 0.9 * plain.tell()


def test_config_diff_names_keys_and_ignores_placement():
    a = redacted(to_config(compose("run.samples=2")))
    b = redacted(to_config(compose("run.samples=3", "run.sampling.temperature=0.1", "engine.num_actors=8",
                                   "ray.num_cpus=64", "engine.cpus_per_actor=4", "run.run_id=other")))
    assert config_diff(a, b) == ["run.samples", "run.sampling.temperature"]
    h = lambda *o: config_hash(redacted(to_config(compose(*o))))  # noqa: E731
    assert h("engine.num_actors=8") == h()
    assert h("run.samples=3") != h()


def test_open_run_new_then_resume_then_refuse(tmp_path):
    cfg = to_config(compose(f"storage.root={tmp_path}", "run.run_id=r1"))
    assert open_run(cfg).state is RunState.NEW
    assert open_run(cfg).state is RunState.RESUME
    cfg.engine.num_actors = 4  # placement may change between attempts
    assert open_run(cfg).state is RunState.RESUME
    cfg.run.samples = 5
    cfg.corpus.limit = 3
    with pytest.raises(RunConflict, match="differing keys: corpus.limit, run.samples"):
        open_run(cfg)
    layout = RunLayout(resolve(str(tmp_path)), "r1")
    layout.manifest.write_json_atomic({"status": "committed"})
    cfg.run.samples, cfg.corpus.limit = 2, None
    assert open_run(cfg).state is RunState.COMMITTED


def test_summary_table_reports_resumed_rows_and_retries():
    stats = ModelStats(model="m", prompts=10, samples=2, rows=20, error_rows=1, prompt_tokens=100,
                       output_tokens=400, wall_s=2.0, engine_s=1.0, new_rows=12, new_output_tokens=240,
                       retries={"engine_starts": 2, "batches": 3, "batches_retried": 1, "rows_retried": 4,
                                "engine_actors": 1, "first_batch_at_s": 1.5})
    text = summary_table(RunResult("r", "/x/runs/r", 11, 10, 1, [stats], state=RunState.RESUME))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["model", "prompts", "samples"]
    # actor-s, tokens per answer (400 / 19 rows that generated), per correct (no labels), cost (no price)
    assert lines[2].split() == ["m", "10", "2", "20", "1", "400", "120.0", "400.0", "0.0", "21.1", "-", "-"]
    assert "m: 8 rows from an earlier attempt, 12 generated now" in text
    assert "m: 1 batches (4 rows) retried, 2 engine starts" in text
    assert "models loading): 1.5 s of 2.0 s wall over 1 generation stage(s)" in text
    assert text.endswith("run r resumed and committed at /x/runs/r")


def test_root_cause_unwraps_chains():
    try:
        try:
            raise ConnectionError("endpoint unreachable\nmore detail")
        except ConnectionError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as e:
        assert root_cause(e) == "ConnectionError: endpoint unreachable"


def test_storage_credentials_are_forwarded_to_workers_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("UNRELATED", "x")
    env = forwarded_env()
    assert env["AWS_SECRET_ACCESS_KEY"] == "s" and "UNRELATED" not in env


def test_a_stage_is_verified_finished_and_read_back_through_the_run(tmp_path):
    run = open_run(to_config(compose(f"storage.root={tmp_path}", "run.run_id=r2")))
    stage = run.layout.generations("m")
    part = lambda keys: schema.conform(pa.table({  # noqa: E731
        **{c: [None] * len(keys) for c in schema.GENERATIONS.names},
        "prompt_id": [k[0] for k in keys], "sample_index": [k[1] for k in keys], "model": ["m"] * len(keys),
        "seed": [1] * len(keys), "output_tokens": [3] * len(keys)}), schema.GENERATIONS)
    from cousins.run.lifecycle import publish_part

    assert publish_part(part([("a", 0), ("b", 0)]), out=stage).to_pylist() == [{"rows": 2, "output_tokens": 6}]
    keys = run.keys(stage)
    assert len(keys) == 2 and run.count(stage) == 2
    asked = pa.table({"prompt_id": ["b", "c", "a", "a"], "sample_index": pa.array([0, 0, 0, 1], pa.int32())})
    assert keys.holds(asked).tolist() == [True, False, True, False]
    with pytest.raises(StageIncomplete, match="generations of m: 2 rows, 2 distinct keys, expected 3; rerun with the same run.run_id=r2"):
        run.verify(stage, 3, "generations of m")
    publish_part(part([("a", 0), ("b", 0)]), out=stage)  # a retried batch rewrites the same part
    assert run.count(stage) == 2
    publish_part(part([("b", 0)]), out=stage)  # a duplicate key in another part is refused
    with pytest.raises(StageIncomplete, match="3 rows, 2 distinct keys"):
        run.verify(stage, 3, "generations of m")
    assert not run.done(stage)
    run.finish(stage, GenerationsDone(wall_s=1.5, new_rows=2, new_output_tokens=6, retries={}))
    assert run.done(stage) and run.marker(stage, GenerationsDone).new_rows == 2


def test_a_stage_is_verified_and_counted_a_batch_at_a_time_by_its_keys_hashes(tmp_path, monkeypatch):
    """Run.verify reads a stage a batch at a time (the driver keeps 16 bytes a row): its counts
    are those of the whole stage, and a duplicate key across batches is still found."""
    import subprocess
    import sys

    from cousins.orchestrate.stages import stage_counts
    from cousins.run import layout as run_layout
    from cousins.run import lifecycle

    run = open_run(to_config(compose(f"storage.root={tmp_path}", "run.run_id=r3")))
    stage = run.layout.generations("m")
    n = 1000
    rows = schema.conform(pa.table({
        **{c: [None] * n for c in schema.GENERATIONS.names}, "model": ["m"] * n, "seed": [1] * n,
        "prompt_id": [f"p{i // 4}" for i in range(n)], "sample_index": [i % 4 for i in range(n)],
        "prompt_tokens": [5] * n, "output_tokens": [i % 7 for i in range(n)], "engine_time_s": [0.5] * n,
        "finish_reason": ["stop" if i % 3 else "length" for i in range(n)],
        "error": [None if i % 100 else f"boom {i}" for i in range(n)]}), schema.GENERATIONS)
    from cousins.run.lifecycle import publish_part

    batches = []  # the stage read back in batches of 64 rows

    def small_batches(stage, columns):
        for b in run_layout.read_batches(stage, columns):
            for small in pa.Table.from_batches([b]).to_batches(max_chunksize=64):
                batches.append(small.num_rows)
                yield small

    monkeypatch.setattr(lifecycle, "read_batches", small_batches)
    assert run.verify(stage, 0, "generations of m", fold=stage_counts) == stage_counts(None, None)  # no part yet
    publish_part(rows, out=stage)
    counts = run.verify(stage, n, "generations of m", fold=stage_counts)
    assert len(batches) == 16 and sum(batches) == n and counts == stage_counts(None, rows)
    assert counts == {"rows": n, "error_rows": 10, "prompt_tokens": 5 * n,
                      "output_tokens": sum(i % 7 for i in range(n)), "engine_s": 0.5 * n,
                      "finish_reasons": {"stop": 666, "length": 334}, "first_error": "boom 0"}
    publish_part(rows.slice(999), out=run.layout.generations("m"))  # the last key again, in another part
    with pytest.raises(StageIncomplete, match=f"{n + 1} rows, {n} distinct keys"):
        run.verify(stage, n + 1, "generations of m", fold=stage_counts)
    # a resumed stage's done keys: which rows to skip, by a binary search over their hashes
    done = lifecycle.KeySet.of(schema.key_hashes(rows.slice(0, 600)))
    assert len(done) == 600 and done.holds(rows).tolist() == [i < 600 for i in range(n)]
    assert not lifecycle.KeySet.of(schema.key_hashes(rows.slice(0, 0))).holds(rows).any()
    real = schema.key_hashes  # every first hash shared: the second ones decide, as exactly
    monkeypatch.setattr(schema, "key_hashes", lambda t, *f: (lambda h: (h.__setitem__("a", 0), h)[1])(real(t, *f)))
    with pytest.raises(StageIncomplete, match=f"{n + 1} rows, {n} distinct keys"):
        run.verify(stage, n + 1, "generations of m", fold=stage_counts)
    done = lifecycle.KeySet.of(schema.key_hashes(rows.slice(0, 600)))
    assert len(done) == 600 and done.holds(rows).tolist() == [i < 600 for i in range(n)]
    monkeypatch.setattr(schema, "key_hashes", real)
    # a column a part lacks reads as nulls, in the order asked for
    batch = next(run_layout.read_batches(stage, ["no_such_column", "prompt_id"]))
    assert batch.schema.names == ["no_such_column", "prompt_id"] and batch.column(0).null_count == batch.num_rows
    # the hashes are the same in every process (workers compare them with the driver's)
    code = ("import pyarrow as pa; from cousins.contract.schema import key_hashes; "
            "print(key_hashes(pa.table({'prompt_id': ['p0', 'x'], 'sample_index': [3, 0]})).tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert other == str(schema.key_hashes(pa.table({"prompt_id": ["p0", "x"], "sample_index": [3, 0]})).tolist())


def test_readers_find_committed_runs_one_way(tmp_path):
    root = resolve(str(tmp_path))
    with pytest.raises(NotCommitted, match="unknown run 'r3'"):
        committed(root, "r3")
    run = open_run(to_config(compose(f"storage.root={tmp_path}", "run.run_id=r3")))
    with pytest.raises(NotCommitted, match="is not committed .no manifest.json."):
        committed(root, "r3")
    run.layout.manifest.write_json_atomic({"status": "failed"})
    with pytest.raises(NotCommitted, match="does not say status 'committed'"):
        committed(root, "r3")
    run.layout.manifest.write_json_atomic({"status": "committed", "models": [{"name": "m"}]})
    assert committed(root, "r3").model_names() == ["m"]
    assert committed_at(f"file://{tmp_path}/runs/r3").run_id == "r3"
    run.finish(run.layout.prompts, PromptsDone(rows=0))
    assert committed(root, "r3").read(run.layout.prompts, ["prompt_id"]).num_rows == 0


def test_the_verification_benchmark_runs_and_prints_its_bytes_per_row(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cousins.bench.verify", "--rows", "2000,6000", "--dir", str(tmp_path)],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "2,000 rows: verified in" in out and "6,000 rows: verified in" in out
    assert out.strip().splitlines()[-1].startswith("bytes_per_row=")
    assert list(tmp_path.iterdir()) == []  # its stages are removed
