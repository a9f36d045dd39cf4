"""Models' passes side by side (cousins/orchestrate/schedule.py): what is admitted at once, largest
first, a pass too big to share runs alone, a failing pass does not stop the others; and a drift run
on a local Ray with room for several fake engines at once gives the rows of a run one model at a time."""

from __future__ import annotations

import json
import threading
import time

import pyarrow.dataset as pads
import pytest

from cousins.orchestrate.schedule import Need, Pass, any_two_fit, side_by_side, slots


class Recorder:
    def __init__(self):
        self.lock, self.now, self.most, self.order = threading.Lock(), 0, 0, []

    def job(self, name: str, seconds: float = 0.05, fail: bool = False):
        def run():
            with self.lock:
                self.order.append(name)
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(seconds)
            with self.lock:
                self.now -= 1
            if fail:
                raise RuntimeError(f"{name} broke")
            return name.upper()
        return run


def test_as_many_at_once_as_the_room_holds_largest_first():
    r = Recorder()
    passes = [Pass("small", Need(1, 0), r.job("small")), Pass("big", Need(2, 0), r.job("big")),
              Pass("mid", Need(1.5, 0), r.job("mid")), Pass("tiny", Need(0.5, 0), r.job("tiny"))]
    out = side_by_side(passes, Need(3, 0))
    assert out == {"small": "SMALL", "big": "BIG", "mid": "MID", "tiny": "TINY"}
    assert r.order[0] == "big" and r.most >= 2  # big + small (or + tiny) fit in 3 CPUs
    r = Recorder()
    side_by_side([Pass(n, Need(1, 0), r.job(n)) for n in "abcdef"], Need(4, 0), max_parallel=2)
    assert r.most == 2  # engine.max_parallel_models caps it
    r = Recorder()
    side_by_side([Pass(n, Need(1, 1), r.job(n)) for n in "abc"], Need(8, 1))
    assert r.most == 1  # one GPU: one at a time whatever the CPUs


def test_a_pass_bigger_than_the_room_runs_alone_and_a_failure_lets_the_others_finish():
    r = Recorder()
    out = side_by_side([Pass("huge", Need(9, 0), r.job("huge")), Pass("a", Need(1, 0), r.job("a"))], Need(2, 0))
    assert out == {"huge": "HUGE", "a": "A"} and r.most == 1
    r = Recorder()
    with pytest.raises(RuntimeError, match="b broke"):
        side_by_side([Pass("a", Need(1, 0), r.job("a", 0.2)), Pass("b", Need(1, 0), r.job("b", 0.01, fail=True)),
                      Pass("c", Need(1, 0), r.job("c"))], Need(2, 0))
    assert sorted(r.order) == ["a", "b", "c"]  # c still ran after b failed
    # how many passes run at once (the engine hosts started ahead of them: cousins/engine/hosts.py)
    assert slots(Need(1, 1), Need(7, 4), passes=7) == 4  # GPUs bound it
    assert slots(Need(1, 0), Need(3, 0), passes=7, max_parallel=2) == 2
    assert slots(Need(4, 0), Need(1, 0), passes=3) == 1  # too big to share: alone
    assert slots(Need(0, 0), Need(1, 0), passes=3) == 3
    assert any_two_fit([Pass("a", Need(1, 0), None), Pass("b", Need(1, 0), None)], Need(2, 0))
    assert not any_two_fit([Pass("a", Need(1, 0), None), Pass("b", Need(1, 0), None)], Need(2, 0), max_parallel=1)
    assert not any_two_fit([Pass("a", Need(2, 0), None), Pass("b", Need(1, 0), None)], Need(2, 0))


def test_the_benchmarks_projection_places_passes_as_the_scheduler_does():
    """drift_parallel's projection: the original, then the others longest first on the slot that
    frees first; the start-up share and parts summed over passes."""
    from types import SimpleNamespace

    from cousins.bench.parallel import _lead_ins, projected_wall

    assert projected_wall(10, [5] * 7, 1) == 45 and projected_wall(10, [5] * 7, 8) == 15
    assert projected_wall(10, [5] * 7, 4) == 20 and projected_wall(1, [4, 3, 3, 2], 2) == 7  # 4+2 | 3+3
    stats = [SimpleNamespace(wall_s=10.0, retries={"first_batch_at_s": 6.0, "startup_s": {"vllm_import_s": 3.0}}),
             SimpleNamespace(wall_s=5.0, retries={"first_batch_at_s": 4.0, "startup_s": {"vllm_import_s": 2.5}}),
             SimpleNamespace(wall_s=1.0, retries=None)]  # done by an earlier attempt: no timeline
    assert _lead_ins(stats) == (10.0, 15.0, {"vllm_import_s": 5.5})


@pytest.fixture(scope="module")
def ray_wide(own_ray):
    """A local Ray with room for four one-CPU fake engines beside Ray Data's own tasks."""
    import ray

    from conftest import ROOT

    ray.init(address="local", num_cpus=5, object_store_memory=512 << 20, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
    yield ray
    ray.shutdown()


def _rows(root, run_id: str, stage: str) -> dict:
    from cousins.run.layout import RunLayout, part_files
    from cousins.run.storage import resolve

    layout = RunLayout(resolve(str(root)), run_id)
    out = {}
    for name in ("q", "r", "words", "noise-floor"):
        loc = layout.generations(name) if stage == "generations" else layout.drift(name)
        t = pads.dataset(part_files(loc), format="parquet").to_table()
        drop = [c for c in ("engine_time_s", "engine_node", "original_text", "cousin_text") if c in t.column_names]
        out[name] = t.drop_columns(drop).sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    return out


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_drift_run_side_by_side_gives_the_rows_of_one_model_at_a_time(ray_wide, tmp_path, capsys):
    from fake_engine import FakeBackend
    from test_pipeline import fake_config

    def run(run_id: str, *extra: str):
        trace = tmp_path / f"trace-{run_id}"
        trace.mkdir()
        traces[run_id] = trace
        cfg = fake_config(tmp_path, "run=greedy", f"run.run_id={run_id}", "drift.bootstrap=20", "corpus.limit=8",
                          "cousins=none",
                          f"+cousins.q={{kind:quantized,path:'{tmp_path / 'q'}'}}",
                          f"+cousins.r={{kind:quantized,path:'{tmp_path / 'r'}'}}",
                          f"+cousins.words={{kind:other,path:'{tmp_path / 'words'}',text_only:true}}", *extra,
                          config_name="drift")
        from cousins.orchestrate.pipeline import run_drift

        return run_drift(cfg, backend=FakeBackend(trace_dir=str(trace)))[1]

    def loads(run_id: str) -> list[dict]:
        return [json.loads(f.read_text()) for f in traces[run_id].glob("*.json")]

    traces = {}
    one_at_a_time = run("sequential", "engine.max_parallel_models=1")
    assert "side by side" not in capsys.readouterr().out
    parallel = run("parallel")
    assert "side by side: " in capsys.readouterr().out  # several passes were in flight at once
    for stage in ("generations", "drift"):
        a, b = _rows(tmp_path / "out", "sequential", stage), _rows(tmp_path / "out", "parallel", stage)
        for name in a:
            assert a[name].equals(b[name]), (stage, name)
    assert parallel["noise_floor"]["metrics"]["kld_mean"]["value"] == 0
    assert [c["name"] for c in parallel["cousins"]] == [c["name"] for c in one_at_a_time["cousins"]]

    # Engine processes kept across passes (engine.keep_processes, cousins/engine/hosts.py): one at a
    # time, every model's engine loads in the one process the original's pass started; side by side,
    # in as many as were in flight at once; with the setting off, each pass starts its own. Same rows.
    fresh = run("fresh", "engine.max_parallel_models=1", "engine.keep_processes=false")
    models = {"tiny-teacher", "q", "r", "words", "noise-floor"}
    for run_id in ("sequential", "parallel", "fresh"):
        assert sorted(x["model"] for x in loads(run_id)) == sorted(models), run_id  # one engine load a model
    assert len({x["pid"] for x in loads("sequential")}) == 1
    assert 1 < len({x["pid"] for x in loads("parallel")}) < len(models)
    assert len({x["pid"] for x in loads("fresh")}) == len(models)
    for stage in ("generations", "drift"):
        a, b = _rows(tmp_path / "out", "sequential", stage), _rows(tmp_path / "out", "fresh", stage)
        for name in a:
            assert a[name].equals(b[name]), (stage, name)
    assert [c["name"] for c in fresh["cousins"]] == [c["name"] for c in one_at_a_time["cousins"]]
