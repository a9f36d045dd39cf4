"""The two orchestrations, composed in plain code from the stages:

- generate: corpus -> prompts -> generations of the original and every cousin -> commit.
- drift: the same, plus the noise floor; every scoring model scores the original's outputs;
  the diff; commit with summary.json and report.html.

A run job's config is read here and in cousins/engine/plan.py (which turns it into the narrow values
the stages take: engine specs, placements, sampling, seeds); the stages never see it. The run's life
(open, stages, markers, commit) belongs to cousins/run/lifecycle.py, its layout and the reading of
its stages to cousins/run/layout.py, the manifest to cousins/orchestrate/manifest.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

from cousins.contract.config import Config
from cousins.contract.codec import encode
from cousins.contract.records import ModelEntry, ModelStats, ScoresDone
from cousins.contract.redact import redacted
from cousins.drift.answers import Rule
from cousins.drift.diff import DiffSettings, drift_headline, stage_diff
from cousins.drift.summary import BootstrapSpec
from cousins.engine import hosts, plan
from cousins.engine.placement import check_fits, cluster_shapes, uses_groups
from cousins.family import prepare as family
from cousins.orchestrate.accounting import RunResult, efficiency
from cousins.orchestrate.manifest import decode_summary, manifest, result_from_manifest
from cousins.orchestrate import schedule
from cousins.orchestrate.stages import ScoreJob, check_cpu_room, stage_generate, stage_kld, stage_prompts, stage_score
from cousins.run.layout import DRIFT, KLD, SCORES
from cousins.run.lifecycle import Run, RunState, open_run as _open_run
from cousins.run.storage import resolve


def open_run(cfg: Config) -> Run:
    """Create `cfg`'s run, or find it for a resume; RunConflict if it exists with another config."""
    return _open_run(resolve(cfg.storage.root, **cfg.storage.options), cfg.run.run_id, redacted(cfg))


def run_prompts(cfg: Config, run: Run):
    c = cfg.corpus
    return stage_prompts(run, corpus_at=resolve(c.path, **cfg.storage.options), fmt=c.format, fields=c.fields,
                         limit=c.limit, max_chars=c.max_chars, rule=Rule.of_config(cfg),
                         answer=c.answer)


def generate_model(cfg: Config, run: Run, prompts, n_prompts: int, entry: ModelEntry, backend=None,
                   score_original: str | None = None, seed: int | None = None) -> ModelStats:
    """A model's generation stage; with `score_original`, its scoring of that model's outputs in
    the same pass (one engine start for both; the original's own scores come from its generation).
    `seed`: the base seed of its samples (default run.sampling.seed, every model's)."""
    job = None if score_original is None else ScoreJob(original=score_original, topk=cfg.drift.score_topk,
                                                       shuffle_seed=plan.shuffle_seed(cfg, plan.SCORE_SHUFFLE))
    stats = stage_generate(run, prompts, n_prompts, entry=entry, spec=plan.engine_spec(cfg, entry),
                           sampling=plan.sampling(cfg), where=plan.placement(cfg, entry.name, reorder=entry.reorder),
                           samples=cfg.run.samples, seed=cfg.run.sampling.seed if seed is None else seed,
                           shuffle_seed=plan.shuffle_seed(cfg, plan.GENERATION_SHUFFLE),
                           rows_per_file=cfg.storage.rows_per_file, backend=backend, score=job)
    return dataclasses.replace(stats, price_per_accelerator_hour=cfg.cost.price_per_accelerator_hour,
                               **efficiency(run.layout.prompts, run.layout.generations(entry.name),
                                            Rule.of_config(cfg)))


def _score(cfg: Config, run: Run, entry: ModelEntry, original: ModelEntry, backend=None) -> ScoresDone:
    return stage_score(run, entry=entry, original=original.name, spec=plan.engine_spec(cfg, entry),
                       topk=cfg.drift.score_topk, where=plan.placement(cfg, entry.name, reorder=entry.reorder),
                       shuffle_seed=plan.shuffle_seed(cfg, plan.SCORE_SHUFFLE), rows_per_file=cfg.storage.rows_per_file, backend=backend)


def check_engines_fit(cfg: Config) -> None:
    """Every model's engine pool against the connected cluster's shape, before any stage: a pool it
    cannot hold is refused now (PlacementError, RuntimeError), not after the prompts are written."""
    shapes = cluster_shapes()
    seen = set()
    for _, where in plan.placements(cfg):
        if where in seen:
            continue
        seen.add(where)
        check_cpu_room(where)
        check_fits(where, shapes)


def _side_by_side(cfg: Config, run: Run, prompts, n_prompts: int, entries: list[ModelEntry], original: ModelEntry,
                  backend=None) -> list[ModelStats]:
    """The other models' passes (each generating and scoring the original's outputs), side by side
    where the cluster has room (cousins/orchestrate/schedule.py); their stats in `entries`' order."""
    from cousins.run import progress

    def one(e: ModelEntry):
        return lambda: generate_model(cfg, run, prompts, n_prompts, e, backend,
                                      score_original=None if e.text_only else original.name)

    passes = [schedule.Pass(e.name, schedule.need(plan.placement(cfg, e.name, reorder=e.reorder)), one(e))
              for e in entries]

    def started(names: list[str]) -> None:
        if len(names) > 1:
            print(f"side by side: {', '.join(names)}", flush=True)

    room, cap = schedule.capacity(), cfg.engine.max_parallel_models
    together = schedule.any_two_fit(passes, room, cap)
    # several bars redrawn in place would overwrite each other: a line each, in turn
    with progress.lines() if together else contextlib.nullcontext():
        done = schedule.side_by_side(passes, room, max_parallel=cap, on_start=started)
    return [done[e.name] for e in entries]


def _prestart(cfg: Config, entries: list[ModelEntry], backend=None) -> None:
    """Engine hosts for the passes side by side started with the original's (cousins/engine/hosts.py):
    as many as those passes will hold at once, importing vLLM while the original's pass runs. Only
    when every pass has the original's engine shape (one GPU or none an engine)."""
    pool = hosts.active_pool()
    wheres = [plan.placement(cfg, e.name, reorder=e.reorder) for e in entries]
    if pool is None or len(entries) < 2 or len({hosts.shape(w) for w in wheres}) > 1 or any(map(uses_groups, wheres)):
        return
    each = max(wheres[1:], key=lambda w: w.num_actors)  # the largest pool of the passes side by side
    n = schedule.slots(schedule.need(each), schedule.capacity(), len(entries) - 1, cfg.engine.max_parallel_models)
    pool.prestart(each, n * each.num_actors, backend)


def run_generate(cfg: Config, run: Run | None = None, *, backend=None) -> RunResult:
    """Run (or resume) generation for `cfg` (validated, paths resolved) on the connected Ray:
    the original and every cousin, on the same prompts and seeds. `backend`: the engines' way to
    vLLM (tests pass a fake)."""
    run = run or open_run(cfg)
    if run.state is RunState.COMMITTED:
        return result_from_manifest(run)
    check_engines_fit(cfg)
    print(f"run {run.run_id} ({'resuming' if run.state is RunState.RESUME else 'new'}) at {run.url}", flush=True)
    prompts, n_prompts, n_errors = run_prompts(cfg, run)
    entries = plan.model_entries(cfg)
    with hosts.hosted(cfg.engine.keep_processes):  # one engine process per slot for every model's pass
        stats = [generate_model(cfg, run, prompts, n_prompts, e, backend) for e in entries]
    result = run_result(run, n_prompts, n_errors, stats)
    run.commit(manifest(cfg, run, result, entries))
    return result


def run_drift(cfg: Config, run: Run | None = None, *, backend=None) -> tuple[RunResult, dict]:
    """Generate with the original, every cousin and the noise floor; score the original's outputs
    with each; diff; commit summary.json, report.html and the manifest. Returns (result, summary)."""
    run = run or open_run(cfg)
    if run.state is RunState.COMMITTED:
        return result_from_manifest(run), decode_summary(run)
    check_engines_fit(cfg)
    print(f"run {run.run_id} ({'resuming' if run.state is RunState.RESUME else 'new'}) at {run.url}", flush=True)
    prompts, n_prompts, n_errors = run_prompts(cfg, run)
    entries = plan.model_entries(cfg, noise_floor=cfg.drift.noise_floor)
    original = entries[0]
    # the passes share engine processes (cousins/engine/hosts.py), ended before the diff
    with hosts.hosted(cfg.engine.keep_processes):
        _prestart(cfg, entries, backend)
        t0 = time.perf_counter()
        # The original first (the others score its outputs); then each other model generates and
        # scores the original's outputs in one pass, on one engine start.
        stats = [generate_model(cfg, run, prompts, n_prompts, original, backend, score_original=original.name)]
        stats += _side_by_side(cfg, run, prompts, n_prompts, entries[1:], original, backend)
        t1 = time.perf_counter()
        failed = {s.model for s in stats if s.error_rows == s.rows}  # it failed to load: nothing to score with
        scorers = [e for e in entries if not e.text_only and (e.is_original or e.name not in failed
                                                              or run.done(run.layout.scores(e.name)))]
        # every model's scores were done in its pass (these read their markers); a stage a resumed
        # run still lacks (the original's, when its generation was resumed) is scored now
        scores = {e.name: _score(cfg, run, e, original, backend) for e in scorers}
        t2 = time.perf_counter()
        d = cfg.drift
        routes = {}
        if d.kld == "exact":  # one more pass per compared model: its engine and the original's in one actor
            for e in [e for e in scorers[1:] if e.name not in failed]:
                route, why = plan.kld_route(cfg, e.name)  # (as printed before Ray; a student built since, now)
                routes[e.name] = route if why is None else f"{route}: {why}"
                stage_kld(run, entry=e, original=plan.engine_spec(cfg, original), spec=plan.engine_spec(cfg, e),
                          where=plan.placement(cfg, e.name), rows_per_file=cfg.storage.rows_per_file, backend=backend,
                          route=route)
        t3 = time.perf_counter()
    settings = DiffSettings(score_topk=d.score_topk, rule=Rule.of_config(cfg), worst_n=d.worst_n,
                            bootstrap=BootstrapSpec.of(d), kld=d.kld)
    summary = stage_diff(run, entries, settings,
                         extra={"accounting": {s.model: encode(s.accounting()) for s in stats},
                                "cost_currency": cfg.cost.currency, **({"kld_routes": routes} if routes else {})},
                         timings={"generate_s": t1 - t0, "score_s": t2 - t1,
                                  **({"kld_s": t3 - t2} if d.kld == "exact" else {}),
                                  # the engines' working windows (first batch begun to last done),
                                  # without engine start-up: what the passes cost in steady state
                                  "generate_busy_s": _busy(s.retries for s in stats),
                                  # scoring batches' windows (in the models' shared passes); the
                                  # original's scores come from its generation: no window of their own
                                  "score_busy_s": _busy(s.retries for s in scores.values()
                                                        if not (s.retries or {}).get("from_generation"))})
    result = run_result(run, n_prompts, n_errors, stats)
    layout = run.layout
    stages = {**{layout.stage_key(SCORES, n): "done" for n in scores},
              **({layout.stage_key(KLD, e.name): "done" for e in scorers[1:] if e.name not in failed}
                 if d.kld == "exact" else {}),
              **{layout.stage_key(DRIFT, e.name): "done" for e in entries[1:]}, "summary.json": "done", "report.html": "done"}
    run.commit(manifest(cfg, run, result, entries, stages=stages, drift=drift_headline(summary),
                        scores={n: dataclasses.replace(s, retries=None) for n, s in scores.items()}))
    return result, summary


def build_students(cfg: Config, run_id: str) -> None:
    """Train every absent distilled cousin; one without `distill_from` learns from a teacher-data
    run of the original that is committed first (run id `{run_id}.teacher-data`)."""
    from cousins.family import student

    for name in family.students_to_build(cfg):
        c = cfg.cousins[name]
        source = c.distill_from
        if source is None:
            result = run_generate(family.teacher_data_config(cfg, run_id))
            source = result.run_url
            print(f"teacher data for cousin {name!r}: {result.models[0].rows} rows in run {result.run_id}", flush=True)
        data = student.read_teacher_data(source, cfg.model.name, cfg.storage.options)
        print(f"training cousin {name!r} ({c.distill_mode}) on {data.num_rows} teacher rows from {source}", flush=True)
        student.build_student(c.path, family.original_dir(cfg), data, mode=c.distill_mode, seed=cfg.model.seed,
                              steps=c.distill_steps, source=source, setting=f"cousins.{name}.path")


# --- results and the manifest ----------------------------------------------------------------------

def _busy(retries) -> float | None:
    """The sum of the stages' engine working windows; None when a stage has none on record
    (done by an earlier attempt, or no batch ran)."""
    windows = [(r or {}).get("busy_window_s") for r in retries]
    return sum(windows) if windows and all(w is not None for w in windows) else None


def run_result(run: Run, n_prompts: int, n_errors: int, stats: list[ModelStats]) -> RunResult:
    return RunResult(run_id=run.run_id, run_url=run.url, corpus_rows=n_prompts + n_errors, prompts=n_prompts,
                     corpus_errors=n_errors, models=stats, state=run.state)


