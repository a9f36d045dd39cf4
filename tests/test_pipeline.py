"""The orchestrations end to end on a local Ray with the fake engine (tests/fake_engine.py): stages,
resume, a cousin that cannot load, the diff, recompute, and every JSON a run holds read back through
its declaration (cousins/contract/records.py, summary.py). Real vLLM runs of the same paths are in test_generate.py and
test_drift_vllm.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from conftest import TEST_API_KEY, TEST_API_KEY_ENV, compose
from cousins.drift.answers import Rule
from cousins.contract import codec, records
from cousins.contract.config import resolve_paths, to_config
from cousins.contract.summary import Summary
from cousins.drift.diff import recompute
from cousins.drift.summary import BootstrapSpec
from cousins.engine.placement import PlacementError
from cousins.orchestrate.pipeline import open_run, run_drift, run_generate
from cousins.run.lifecycle import RunState, committed, read_marker
from cousins.run.layout import part_files
from cousins.run.storage import resolve
from fake_engine import FakeBackend
from fake_server import FakeServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MARKERS = {"prompts": records.PromptsDone, "errors": records.PromptsDone, "generations": records.GenerationsDone,
           "scores": records.ScoresDone, "kld": records.ScoresDone, "drift": records.DriftDone}


def fake_config(tmp_path, *overrides, config_name="generate"):
    return resolve_paths(to_config(compose(
        f"model.path={tmp_path / 'teacher'}", f"storage.root={tmp_path / 'out'}", "corpus.limit=24",
        "run.sampling.max_tokens=12", "engine.batch_size=8", "storage.rows_per_file=8", *overrides,
        config_name=config_name)))


def every_json_reads_back_as_declared(run_dir: str) -> int:
    """Decode every JSON file of a run with its record; encoding it again gives the same JSON."""
    checked = 0
    for dirpath, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, run_dir).split(os.sep)
            if name == "manifest.json":
                cls = records.Manifest
            elif name == "summary.json":
                cls = Summary
            elif name == "_SUCCESS":
                cls = MARKERS[rel[0]]
            else:
                continue
            data = json.loads(open(path).read())
            assert codec.encode(codec.decode(cls, data, path)) == data, path
            checked += 1
    return checked


@pytest.fixture(scope="module")
def drift_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fake-drift")
    cfg = fake_config(tmp, "run=greedy", "run.run_id=fake-drift", "drift.bootstrap=50", "cousins=none",
                      "cost.price_per_accelerator_hour=2.0",
                      f"+cousins.q={{kind:quantized,path:'{tmp / 'q'}'}}",
                      f"+cousins.broken={{kind:other,path:'{tmp / 'broken'}'}}",
                      f"+cousins.words={{kind:other,path:'{tmp / 'words'}',text_only:true}}", config_name="drift")
    result, summary = run_drift(cfg, backend=FakeBackend(fail_loading=("broken",)))
    return cfg, result, summary


def test_a_drift_run_commits_with_the_noise_floor_at_zero_and_a_failed_cousin_as_data(drift_run):
    cfg, result, summary = drift_run
    assert [s.model for s in result.models] == ["tiny-teacher", "q", "broken", "words", "noise-floor"]
    assert all(s.rows == 24 for s in result.models)
    by = {c["name"]: c for c in summary["cousins"]}
    assert summary["noise_floor"]["metrics"]["kld_mean"]["value"] == 0.0
    assert summary["noise_floor"]["metrics"]["exact_match"]["value"] == 1.0
    assert by["q"]["metrics"]["kld_mean"]["value"] > 0.01 and by["q"]["error"] is None
    assert by["broken"]["error"].startswith("engine failed to load 'broken'") and by["broken"]["rows"] == 24
    assert by["words"]["text_only"] and "kld_mean" not in by["words"]["metrics"]
    run = committed(resolve(cfg.storage.root), result.run_id)
    m = run.typed()
    # every model but the text-only one scored the original's outputs; the broken cousin in the
    # same pass as its generation, so its scores are error rows with the same reason
    assert set(m.scores) == {"tiny-teacher", "q", "broken", "noise-floor"}
    assert set(m.drift) == {"q", "broken", "words", "noise-floor"}
    assert m.scores["broken"].error_rows == m.scores["broken"].rows == 24
    assert m.scores["q"].error_rows == 0 and m.scores["q"].rows == 24
    assert m.scores["noise-floor"].reordered and m.scores["noise-floor"].batch_size == 7
    # one engine start per model: the others' scoring ran on their generation engines
    starts = {s.model: s.retries["engine_starts"] for s in result.models}
    assert starts == {"tiny-teacher": 1, "q": 1, "broken": 0, "words": 1, "noise-floor": 1}, starts
    assert read_marker(run.layout.scores("tiny-teacher"), records.ScoresDone).retries == {"from_generation": True}
    assert read_marker(run.layout.scores("q"), records.ScoresDone).retries["shared_engine_with_generation"]


def test_exact_kld_replaces_the_bound_row_by_row_and_is_never_below_it(drift_run, monkeypatch):
    """drift.kld=exact on the same prompts and seeds as the top-k run: a kld/ stage per compared
    model by hidden states (the fake models have no config.json to read their heads' settings
    from: taken as plain heads here), the drift rows' KLD from it (at least the top-k bound at
    every token), the noise floor at 0, no rest-mass warning, and the diff recomputed from the
    stored stages the same."""
    from cousins.engine import plan

    monkeypatch.setattr(plan, "head_refusal", lambda cfg, name: None)
    cfg, _, topk = drift_run
    home = Path(cfg.model.path).parent  # the same (fake) teacher and storage as the top-k run
    exact_cfg = fake_config(home, "run=greedy", "run.run_id=fake-exact", "drift.bootstrap=50", "cousins=none",
                            f"+cousins.q={{kind:quantized,path:'{cfg.cousins['q'].path}'}}",
                            f"+cousins.broken={{kind:other,path:'{home / 'broken'}'}}", "drift.kld=exact",
                            config_name="drift")
    result, summary = run_drift(exact_cfg, backend=FakeBackend(fail_loading=("broken",)))
    assert summary["kld"] == "exact" and summary["warnings"] == [] and "whole vocabulary" in summary["kld_bound"]
    assert summary["kld_routes"] == {"q": "hidden", "noise-floor": "hidden"}  # both heads plain: by hidden states
    run = committed(resolve(exact_cfg.storage.root), result.run_id)
    assert set(run.typed().stages) >= {"kld/model=q", "kld/model=noise-floor"}
    assert "kld/model=broken" not in run.typed().stages  # it never loaded: nothing to compare
    assert summary["noise_floor"]["metrics"]["kld_mean"]["value"] == 0.0
    by = {c["name"]: c for c in summary["cousins"]}
    bound = {c["name"]: c for c in topk["cousins"]}["q"]["metrics"]["kld_mean"]["value"]
    assert by["q"]["metrics"]["kld_mean"]["value"] >= bound > 0.01
    rows = {(r["prompt_id"], r["sample_index"]): r for r in pads.dataset(
        part_files(run.layout.drift("q")), format="parquet").to_table().to_pylist()}
    old = committed(resolve(cfg.storage.root), "fake-drift")
    for r in pads.dataset(part_files(old.layout.drift("q")), format="parquet").to_table().to_pylist():
        ex = rows[(r["prompt_id"], r["sample_index"])]
        assert ex["rest_mass_tokens"] == r["rest_mass_tokens"]
        assert all(e >= b - 1e-6 for e, b in zip(ex["kld_tokens"], r["kld_tokens"]))
        assert len(ex["rkld_tokens"]) == len(ex["kld_tokens"]) and set(ex["tail_mass_tokens"]) <= {0.0}
        assert r["rkld_tokens"] is None  # the top-k run has no reverse KLD
    assert by["q"]["metrics"]["rkld_mean"]["value"] > 0.01 and by["q"]["metrics"]["tail_mass_max"]["value"] == 0.0
    again = recompute(resolve(exact_cfg.storage.root), result.run_id, bootstrap=BootstrapSpec.of(exact_cfg.drift),
                      rule=Rule(exact_cfg.drift.answer_match), worst_n=exact_cfg.drift.worst_n)
    assert again["kld"] == "exact" and again["cousins"][0]["metrics"] == summary["cousins"][0]["metrics"]


def test_the_plane_places_every_model_from_its_stored_rows(drift_run):
    from cousins.drift.answers import correct
    from cousins.drift.plane import accuracy_se

    cfg, result, summary = drift_run
    layout = committed(resolve(cfg.storage.root), result.run_id).layout
    refs = {r["prompt_id"]: r["reference"] for r in pads.dataset(part_files(layout.prompts)).to_table().to_pylist()
            if r["reference"] is not None}
    assert refs, "the demo corpus has labelled prompts"
    plane = summary["plane"]
    by = {m["name"]: m for m in plane["models"]}
    assert list(by) == ["tiny-teacher", "q", "broken", "words", "noise-floor"]
    assert plane["axes"] == ["accuracy", "tokens_per_correct", "cost_per_1m_output_tokens"] and plane["currency"] == "USD"
    for name in ("tiny-teacher", "q", "words", "noise-floor"):
        per_prompt: dict[str, list[int]] = {}
        tokens = 0
        for r in pads.dataset(part_files(layout.generations(name))).to_table().to_pylist():
            if r["prompt_id"] in refs and r["error"] is None:
                n_c = per_prompt.setdefault(r["prompt_id"], [0, 0])
                n_c[0] += 1
                n_c[1] += correct(r["output_text"], refs[r["prompt_id"]], cfg.drift.answer_match)
                tokens += r["output_tokens"]
        n, c = (np.array(x, dtype=float) for x in zip(*per_prompt.values()))
        m, a = by[name], summary["accounting"][name]
        assert (m["labelled_rows"], m["correct_rows"], m["labelled_prompts"]) == (n.sum(), c.sum(), len(n))
        assert a["accuracy_se"] == pytest.approx(
            accuracy_se(c.sum(), n.sum(), len(n), (c * c).sum(), (c * n).sum(), (n * n).sum()))
        assert m["accuracy"]["value"] == pytest.approx(c.sum() / n.sum()) and m["interval_basis"] == "prompts"
        lo, hi = m["accuracy"]["ci"]
        assert 0 <= lo <= m["accuracy"]["value"] <= hi <= 1
        assert m["tokens_per_correct"]["value"] == (pytest.approx(tokens / c.sum()) if c.sum() else None)
        assert m["cost_per_1m_output_tokens"] == pytest.approx(a["cost_per_1m_output_tokens"]) and a["cost_per_1m_output_tokens"] > 0
    assert by["broken"]["labelled_rows"] == 0 and by["broken"]["frontier"] is None  # every row failed: not placed
    assert by["noise-floor"]["frontier"] is None  # a reference
    placed = [by[n] for n in ("tiny-teacher", "q", "words")]
    assert any(m["frontier"] for m in placed)
    assert all(m["frontier"] == (not m["dominated_by"]) for m in placed)
    assert "capability against cost" in layout.report.read_text().lower()


def test_every_json_of_a_run_reads_back_through_its_declaration(drift_run):
    cfg, result, _ = drift_run
    run_dir = committed(resolve(cfg.storage.root), result.run_id).layout.run.path
    # manifest, summary, prompts + errors, 5 generations, 4 scores, 4 drift markers
    assert every_json_reads_back_as_declared(run_dir) == 2 + 2 + 5 + 4 + 4


def test_recompute_gives_the_same_summary_from_stored_rows(drift_run):
    cfg, result, summary = drift_run
    d = cfg.drift
    spec = BootstrapSpec.of(d)
    again = recompute(resolve(cfg.storage.root), result.run_id, rule=Rule(d.answer_match), worst_n=d.worst_n,
                      bootstrap=spec)
    strip = lambda s: {k: v for k, v in s.items() if k not in ("computed", "timings")}  # noqa: E731
    assert strip(again) == strip(summary)
    assert committed(resolve(cfg.storage.root), result.run_id).typed().drift_recomputed == again["computed"]


def test_the_aggregates_merged_by_an_actor_give_the_drivers_summary(drift_run, monkeypatch):
    """A large diff's partials are merged by an actor (drift/rows.py ACCUMULATE_FROM), never
    fetched by the driver: the same summary, figure for figure."""
    from cousins.drift import rows

    cfg, result, summary = drift_run
    d = cfg.drift
    merged, by_actor = [], rows._accumulated

    def spy(*args, **kwargs):
        merged.append(True)
        return by_actor(*args, **kwargs)

    monkeypatch.setattr(rows, "ACCUMULATE_FROM", 1)
    monkeypatch.setattr(rows, "_accumulated", spy)
    again = recompute(resolve(cfg.storage.root), result.run_id, rule=Rule(d.answer_match), worst_n=d.worst_n,
                      bootstrap=BootstrapSpec.of(d))
    strip = lambda s: {k: v for k, v in s.items() if k not in ("computed", "timings")}  # noqa: E731
    assert merged and strip(again) == strip(summary)


def test_a_resumed_generation_keeps_published_rows_and_redoes_only_the_missing_and_recompute_refuses_it(
        ray_local, tmp_path):
    cfg = fake_config(tmp_path, "run.run_id=resumable", "run.samples=2")
    first = run_generate(cfg, backend=FakeBackend())
    layout = committed(resolve(cfg.storage.root), first.run_id).layout
    stage = layout.generations("tiny-teacher")
    before = {f: open(f, "rb").read() for f in part_files(stage)}
    lost = sorted(before)[1]
    for gone in (lost, f"{stage.path}/_SUCCESS", layout.manifest.path):  # a run killed after some parts
        os.remove(gone)
    assert open_run(cfg).state is RunState.RESUME
    again = run_generate(cfg, backend=FakeBackend())
    assert again.state is RunState.RESUME and again.models[0].rows == 48
    assert 0 < again.models[0].new_rows < 48  # only the lost part's rows were generated again
    after = committed(resolve(cfg.storage.root), first.run_id).read(stage).sort_by([("prompt_id", "ascending"),
                                                                                    ("sample_index", "ascending")])
    want = pa.concat_tables([pads.dataset([f], format="parquet").to_table() for f in sorted(before)])
    want = want.sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    same = ["prompt_id", "sample_index", "seed", "output_token_ids", "output_text", "topk_logprobs"]
    assert after.select(same).equals(want.select(same))  # seeds make the redone rows the same rows
    assert every_json_reads_back_as_declared(layout.run.path) == 1 + 2 + 1
    # a committed generation run has nothing to diff: recompute refuses it
    with pytest.raises(FileNotFoundError, match="not a drift run"):
        recompute(resolve(cfg.storage.root), first.run_id, rule=Rule("contains"), worst_n=1,
                  bootstrap=BootstrapSpec.of(cfg.drift))


def test_an_engine_pool_the_cluster_cannot_place_fails_with_the_reason_instead_of_waiting(ray_local, tmp_path):
    cfg = fake_config(tmp_path, "run.run_id=no-gpus", "engine.gpus_per_actor=1")  # (start_timeout_s: 900)
    with pytest.raises(PlacementError, match=r"1 engine\(s\) of 1 GPU and 1 CPU cannot be placed: it needs a node "
                                             r"with 1 GPU .* no node of the cluster \(nodes: 0 GPU/2 CPU\)"):
        run_generate(cfg, backend=FakeBackend())


def test_a_synthetic_copy_of_a_run_diffs_to_the_same_figures_on_twice_the_prompts(drift_run):
    from cousins.bench.scale import synthesize

    cfg, result, summary = drift_run
    root, d = resolve(cfg.storage.root), cfg.drift
    copy = synthesize(root, result.run_id, 2)
    again = recompute(root, copy, rule=Rule(d.answer_match), worst_n=d.worst_n,
                      bootstrap=BootstrapSpec.of(d))
    assert again["prompts"] == 2 * summary["prompts"]
    run = committed(root, copy)
    assert all(run.read(run.layout.drift(c), ["prompt_id"]).num_rows == 48 for c in ("q", "broken", "words"))
    for mine, theirs in zip(again["cousins"], summary["cousins"]):  # every prompt twice: the same means
        for name in ("kld_mean", "same_top1", "chrf", "length_ratio"):
            if name in theirs["metrics"]:
                assert mine["metrics"][name]["value"] == pytest.approx(theirs["metrics"][name]["value"])


def test_the_workers_summary_equals_resampling_every_drift_row_in_one_process(drift_run):
    """The diff's summary (per-prompt sums and histograms merged in the driver) against the code it
    replaced, run on the run's own drift rows: every figure and CI equal, quantiles within the
    sketch's stated error."""
    import summary_reference as reference
    from test_aggregate import _close

    cfg, result, summary = drift_run
    run = committed(resolve(cfg.storage.root), result.run_id)
    spec = BootstrapSpec.of(cfg.drift)
    theirs = {c["name"]: c for c in [*summary["cousins"], summary["noise_floor"]]}
    for name in ("q", "words", "noise-floor"):
        rows = run.read(run.layout.drift(name)).sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
        want = reference.summarise(name, theirs[name]["kind"], rows, spec, text_only=theirs[name]["text_only"])
        _close(json.loads(json.dumps(want)), theirs[name])


def test_an_engine_error_is_kept_to_its_batch_and_the_run_commits(ray_local, tmp_path, capsys):
    """A prompt that makes the engine raise while it steps: its engine actor exits, Ray starts a
    fresh one and Ray Data resends the batches it held; the batch breaks the fresh engine too
    (alone on it), so its rows become error rows with the engine's reason, and every other row lands."""
    corpus = tmp_path / "crash.jsonl"
    prompts = [f"question {i}: what is {i} plus {i}?" for i in range(24)]
    prompts[13] = "please CRASH the engine"
    corpus.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    cfg = fake_config(tmp_path, "run.run_id=crash", "run.samples=2", f"corpus.path={corpus}", "corpus.fields.id=id",
                     "engine.batch_size=4")
    result = run_generate(cfg, backend=FakeBackend())
    stats = result.models[0]
    assert stats.rows == 48 and stats.error_rows == 4  # the crashing prompt's batch: 2 prompts x 2 samples
    run = committed(resolve(cfg.storage.root), result.run_id)
    rows = run.read(run.layout.generations("tiny-teacher")).to_pylist()
    failed = {r["prompt_id"] for r in rows if r["error"]}
    assert "q13" in failed and len(failed) == 2
    assert all(r["error"].startswith("the engine failed on this batch twice") and "fake engine crashed" in r["error"]
               for r in rows if r["error"])
    assert all(r["output_token_ids"] for r in rows if not r["error"])
    # engines that broke: the one the batch broke beside others, the fresh one it broke alone, and
    # any a batch resent by Ray Data reached before the count of its breaks (timing decides)
    assert stats.retries["engine_breaks"] >= 2 and stats.retries["batches_failed_by_engine"] == 1
    assert stats.retries["engine_starts"] >= 3  # the first engine, the one the batch broke alone, and after
    manifest = run.typed()
    assert manifest.row_counts["tiny-teacher"].error_rows == 4
    # the progress lines (stderr: not a terminal here) end with the stages' counts
    err = capsys.readouterr().err.splitlines()
    assert "prompts · 24 prompts · 0 errors · done in" in [x for x in err if x.startswith("prompts")][-1]
    last = [x for x in err if x.startswith("generate tiny-teacher")][-1]
    assert "100% [####################] 48/48 rows" in last and "· 4 errors · done in" in last


def test_a_cousin_behind_an_endpoint_drifts_as_the_same_model_on_an_engine_and_its_key_is_written_nowhere(
        ray_local, tmp_path):
    """Cousin `q` on a (fake) engine and cousin `served`, the same model behind an OpenAI-compatible
    server with an API key: through Ray Data's actors their drift rows are the same, every request
    carried the key, and no file of the run holds it."""
    server = FakeServer({"q-behind-an-api": str(tmp_path / "q")})
    try:
        cfg = fake_config(tmp_path, "run=greedy", "run.run_id=served", "drift.bootstrap=20", "cousins=none",
                          f"+cousins.q={{kind:quantized,path:'{tmp_path / 'q'}'}}",
                          f"+cousins.served={{kind:quantized,endpoint:{{url:'{server.url}',model:q-behind-an-api,"
                          f"api_key_env:{TEST_API_KEY_ENV},max_concurrency:4}}}}", config_name="drift")
        result, summary = run_drift(cfg, backend=FakeBackend())
    finally:
        server.stop()
    run = committed(resolve(cfg.storage.root), result.run_id)
    layout = run.layout
    rows = {name: run.read(layout.drift(name)).sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
            for name in ("q", "served")}
    same = [c for c in rows["q"].column_names if c not in ("cousin", "model")]
    assert rows["served"].num_rows == 24 and rows["served"].select(same).equals(rows["q"].select(same))
    by_name = {c["name"]: c for c in summary["cousins"]}
    assert by_name["served"]["metrics"]["kld_mean"] == by_name["q"]["metrics"]["kld_mean"]
    assert server.requests >= 48 and set(server.keys) == {f"Bearer {TEST_API_KEY}"}
    for dirpath, _, files in os.walk(layout.run.path):
        for name in files:
            assert TEST_API_KEY.encode() not in open(os.path.join(dirpath, name), "rb").read(), name
