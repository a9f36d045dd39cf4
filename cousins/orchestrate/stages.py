"""The run's row stages: prompts, generate, score and exact KLD. Each takes the open run and narrow
values (the engine spec, sampling, placement), writes part files through the run, verifies the
stage and finishes it with its marker record. A finished stage is read back, not redone; an
unfinished one is continued (generations: every published key is kept) or redone (prompts,
scores, exact KLD). Every engine stage runs through `run_engine_stage`, in one of the modes of
cousins/engine/pool.py (MODES).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from cousins.contract import schema
from cousins.contract.config import AnswerConfig, FieldsConfig
from cousins.contract.records import GenerationsDone, ModelEntry, ModelStats, PromptsDone, ScoresDone
from cousins.drift import answers
from cousins.engine import hosts
from cousins.engine.backend import EngineSpec, Placement, Sampling
from cousins.engine.placement import engine_groups, uses_groups
from cousins.engine.pool import MODES, engine_pool
from cousins.engine.rows import SCORE_INPUT, TASK, as_input, expand_samples
from cousins.run import corpus
from cousins.run.dataops import shuffled
from cousins.run.layout import read_rows
from cousins.run.ledger import GENERATE, KLD, SCORE, ledger_key, new_ledger
from cousins.run.lifecycle import Run, publish_part
from cousins.run.progress import Bar, watch
from cousins.run.storage import Location

LIGHT_TASK_CPUS = 0.1  # for cheap maps beside the engine pool, so they never starve behind it


def stage_prompts(run: Run, *, corpus_at: Location, fmt: str, fields: FieldsConfig, limit: int | None,
                  max_chars: int, rule: answers.Rule | None = None, answer: AnswerConfig | None = None):
    """The run's prompts as a Ray Dataset, with (prompts, corpus error rows) counts.

    Once written, a run's prompts are fixed: a resumed run reads them back from the run, not the
    corpus (which may have changed since). With `rule` (how the run judges answers) and `answer`
    (the corpus's checkers), each row's checker is fixed in its prompt row, and a row whose
    reference that checker cannot read becomes an error row naming the checker."""
    import ray.data

    layout = run.layout
    if not (run.done(layout.prompts) and run.done(layout.errors)):
        for loc in (layout.prompts, layout.errors):
            run.restart(loc)
        prompts, errors = corpus.read_corpus(corpus_at, fmt=fmt, fields=fields, limit=limit, max_chars=max_chars)
        if rule is not None:
            prompts, errors = _unreadable_references(prompts, errors, rule, answer or AnswerConfig())
        version = corpus.corpus_version(corpus_at, fmt)
        bar = Bar("prompts", None, unit="prompts")  # counts come at the end; the line says it is running
        with watch(bar):
            counts = {"prompts": prompts.count(), "errors": errors.count()}
            if not counts["prompts"]:  # refused before any engine starts; nothing is finished, so a
                raise corpus.NoUsablePrompt(  # rerun after fixing the corpus reads it again
                    corpus.no_usable_prompt(corpus_at, counts["errors"], errors.take(3)))
            for ds, loc, sch, kind in ((prompts, layout.prompts, schema.PROMPTS, "prompts"),
                                       (errors, layout.errors, schema.ERRORS, "errors")):
                rows = counts[kind]
                if rows:  # (Ray Data would write nothing, then fail to remove the directory on S3)
                    ds.map_batches(schema.conform, fn_kwargs={"schema": sch}, batch_format="pyarrow").write_parquet(
                        loc.path, filesystem=loc.arrow_fs(), compression="zstd")
                run.finish(loc, PromptsDone(rows=rows, corpus=version))
                if kind == "errors":
                    bar.update(bar.done, errors=rows)
                else:
                    bar.update(rows)
    else:
        corpus.note_if_changed(corpus_at, fmt, run.marker(layout.prompts, PromptsDone).corpus)
    n_prompts = run.marker(layout.prompts, PromptsDone).rows
    n_errors = run.marker(layout.errors, PromptsDone).rows
    prompts = read_rows(layout.prompts)
    if prompts is None:
        prompts = ray.data.from_arrow(schema.PROMPTS.empty_table())
    return prompts, n_prompts, n_errors


def _as_error_rows(batch: pa.Table) -> pa.Table:
    return pa.table({"source": batch.column("source"), "source_row": batch.column("source_row"),
                     "reason": batch.column("reason"), "raw": batch.column("reference")}, schema=schema.ERRORS)


def _unreadable_references(prompts, errors, rule: answers.Rule, answer: AnswerConfig):
    """Each prompt's own checker set; prompts whose reference their checker cannot read move to
    the error rows (both materialised)."""
    from ray.data.expressions import col

    marked = prompts.map_batches(answers.reference_errors, fn_kwargs={
        "rule": rule, "by_category": dict(answer.by_category), "corpus_checker": answer.checker},
                                 batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS).materialize()
    bad = marked.filter(expr=col("reason").is_not_null())
    return (marked.filter(expr=col("reason").is_null()).drop_columns(["reason"]).materialize(),
            errors.union(bad.map_batches(_as_error_rows, batch_format="pyarrow")).materialize())


_DONE_CACHE: dict[str, object] = {}


def _drop_done(batch: pa.Table, *, done_ref) -> pa.Table:
    """Keep the rows whose (prompt_id, sample_index) no published part holds yet (`done_ref`: the
    stage's KeySet, its keys' hashes)."""
    import ray

    ref = done_ref.hex()
    if ref not in _DONE_CACHE:  # one fetch per worker process, not per batch
        _DONE_CACHE.clear()
        _DONE_CACHE[ref] = ray.get(done_ref)
    return batch.filter(pa.array(~_DONE_CACHE[ref].holds(batch), pa.bool_()))


def stage_counts(acc: dict | None, t: pa.Table | None) -> dict:
    """A stage's counts from its STAT columns (those `t` has), folded batch by batch (Run.verify);
    (None, None): a stage's counts before its first batch."""
    acc = acc or {"rows": 0, "error_rows": 0, "prompt_tokens": 0, "output_tokens": 0, "engine_s": 0.0,
                  "finish_reasons": {}, "first_error": None}
    if t is None:
        return acc
    errors = t.column("error")
    acc["rows"] += t.num_rows
    acc["error_rows"] += t.num_rows - errors.null_count
    for key, name in (("prompt_tokens", "prompt_tokens"), ("output_tokens", "output_tokens"),
                      ("engine_s", "engine_time_s")):
        if name in t.column_names:
            acc[key] += pc.sum(t.column(name)).as_py() or 0
    if "finish_reason" in t.column_names:
        for vc in pc.value_counts(t.column("finish_reason").drop_null()).to_pylist():
            acc["finish_reasons"][vc["values"]] = acc["finish_reasons"].get(vc["values"], 0) + vc["counts"]
    if acc["first_error"] is None and errors.null_count < t.num_rows:
        acc["first_error"] = errors.drop_null()[0].as_py()
    return acc


def check_cpu_room(where: Placement) -> None:
    """Refuse a CPU-engine pool that would take every CPU: Ray Data's read, shuffle and write
    tasks would then wait forever, silently."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    taken = where.num_actors * where.cpus_per_actor
    if where.gpus_per_actor == 0 and taken > total - 1:
        raise RuntimeError(
            f"engine.num_actors x engine.cpus_per_actor = {taken:g} CPUs leaves less than one of the cluster's "
            f"{total:g} for reading and writing, and the run would stall; lower engine.cpus_per_actor "
            f"(e.g. engine.cpus_per_actor={max(0.25, (total - 1) / where.num_actors):g}) or engine.num_actors")


def accelerator_seconds(where: Placement, spec: EngineSpec, wall_s: float) -> tuple[str, float]:
    """What a stage's engines held: GPU-seconds (x tensor- and pipeline-parallel size), else engine
    actor-seconds."""
    if where.gpus_per_actor > 0:
        return "gpu", (wall_s * where.num_actors * where.gpus_per_actor * spec.tensor_parallel_size
                       * spec.pipeline_parallel_size)
    return "cpu-actor", wall_s * where.num_actors


def _run_pool(ds, what: str, where: Placement):
    """Execute a stage's dataset; a pool that never starts becomes an error that says why."""
    import ray

    try:
        return ds.take_all()
    except ray.exceptions.GetTimeoutError as e:
        raise RuntimeError(
            f"the engine pool of {what} ({where.num_actors} actors x {where.gpus_per_actor:g} GPU, "
            f"{where.cpus_per_actor:g} CPU) did not start within engine.start_timeout_s={where.start_timeout_s}: "
            f"the cluster lacks those resources, or its autoscaler could not add them in time; lower "
            f"engine.num_actors or engine.gpus_per_actor, or grow the cluster") from e


def _ledger_poll(ledger, names: list[str], before: int):
    """A stage's progress from its ledger: (rows done, output tokens, error rows) of the named
    ledger keys' batches (rows and errors of all, the first one's output tokens); `before`: rows an
    earlier attempt published."""
    import ray

    def poll():
        got = ray.get([ledger.progress.remote(n) for n in names], timeout=10)
        return before + sum(g[0] for g in got), got[0][2], sum(g[1] for g in got)
    return poll


def _publish_both(batch: pa.Table, *, gens: Location, scores: Location) -> pa.Table:
    """A batch of BOTH_OUT rows: its generation rows and score rows, each published as its own
    stage's part."""
    out = []
    for task, loc, sch in (("gen", gens, schema.GENERATIONS), ("score", scores, schema.SCORES)):
        part = batch.filter(pc.equal(batch.column(TASK), task))
        if part.num_rows:
            counts = publish_part(schema.conform(part.select(sch.names), schema=sch), out=loc)
            out.append(counts.append_column("task", pa.array([task], pa.string())))
    return pa.concat_tables(out) if out else pa.table({"rows": pa.array([], pa.int64()),
                                                       "output_tokens": pa.array([], pa.int64()),
                                                       "task": pa.array([], pa.string())})


@contextmanager
def _hosts(where: Placement):
    """Inside a run's `hosted()` passes, this pass's engine hosts (kept across passes:
    cousins/engine/hosts.py); else None (the pool's actors hold the engines). Engines of several
    GPUs, in placement groups of their own, are never hosted."""
    pool = hosts.active_pool()
    if pool is None or where.remote_args_fn is not None:  # (run_engine_stage ended the idle hosts first)
        yield None
        return
    with pool.lease(where) as leased:
        yield leased


def run_engine_stage(rows, todo: int, *, mode: str, model: str, where: Placement, what: str, bar: Bar,
                     out: Location, scores_out: Location | None = None, before: int = 0, rows_per_file: int,
                     **actor_kwargs) -> tuple[list[dict], dict[str, dict]]:
    """Every engine stage, whatever its mode (cousins.engine.pool.MODES): `rows` (`todo` of them) through a pool of
    the mode's actors on `where` (its placement groups held for the pool's life), each batch's rows
    published as part files of `out` (and, for a mode whose rows are both kinds, the scores of
    `scores_out`), progress shown on `bar` from the stage's ledger, the ledger stopped at the end.
    Returns (what each publish task wrote, the ledger's report per task of the mode)."""
    import ray

    m = MODES[mode]
    ledger = new_ledger()
    light = {"batch_format": "pyarrow", "num_cpus": LIGHT_TASK_CPUS}
    if hosts.active_pool() is not None and uses_groups(where):
        hosts.active_pool().end_idle()  # its placement groups may need what idle hosts hold
    try:
        with engine_groups(where, what) as placed, _hosts(placed) as leased:
            # input blocks of at most one batch each, so every actor task is one batch and tasks overlap
            blocks = rows.repartition(max(where.num_actors, -(-todo // where.batch_size)))
            engines = engine_pool(blocks, mode, placed, hosts=leased, ledger=ledger, **actor_kwargs)
            publish = (engines.map_batches(_publish_both, fn_kwargs={"gens": out, "scores": scores_out},
                                           batch_size=rows_per_file, **light) if m.both else
                       engines.map_batches(publish_part, fn_kwargs={"out": out}, batch_size=rows_per_file, **light))
            with watch(bar, _ledger_poll(ledger, [ledger_key(model, task) for task in m.tasks], before)):
                written = _run_pool(publish, what, placed)
            reports = {task: ray.get(ledger.report.remote(ledger_key(model, task))) for task in m.tasks}
    finally:
        ray.kill(ledger)
    return written, reports


@dataclass(frozen=True)
class ScoreJob:
    """Scoring the original's outputs in the same pass (and engines) as a model's generation."""

    original: str
    topk: int
    shuffle_seed: int  # reorders the rows to score of a `reorder` entry


def _original_rows(run: Run, original: str, shuffle_seed: int | None = None):
    """The original's generation rows as the engines score them (SCORE_INPUT), reshuffled with
    `shuffle_seed` for a `reorder` entry."""
    stage = run.layout.generations(original)
    rows = read_rows(stage, SCORE_INPUT)
    return shuffled(rows, run.count(stage), shuffle_seed) if shuffle_seed is not None else rows


def stage_generate(run: Run, prompts, n_prompts: int, *, entry: ModelEntry, spec: EngineSpec, sampling: Sampling,
                   where: Placement, samples: int, seed: int, shuffle_seed: int, rows_per_file: int,
                   backend=None, score: ScoreJob | None = None) -> ModelStats:
    """Generate (or finish generating) one model's rows. A cousin that fails to load writes error
    rows with the reason (and the run goes on); the original failing to load fails the run.
    `shuffle_seed` reorders the rows of a `reorder` entry (the noise floor). With `score`, the
    same pass (one engine start per actor) also scores the original's outputs, when this model's
    scores are not done yet; the scores stage is finished with its own marker."""
    out = run.layout.generations(entry.name)
    expected = n_prompts * samples
    what = f"generations for model {entry.name!r}"
    if run.done(out):
        done = run.marker(out, GenerationsDone)
        return ModelStats(model=entry.name, prompts=n_prompts, samples=samples, wall_s=done.wall_s,
                          new_rows=done.new_rows, new_output_tokens=done.new_output_tokens, retries=done.retries,
                          accelerator=done.accelerator, accelerator_s=done.accelerator_s,
                          **run.verify(out, expected, what, fold=stage_counts))

    check_cpu_room(where)
    t0 = time.perf_counter()
    done_keys = run.keys(out)
    new_rows = new_tokens = 0
    retries: dict = {}
    scores_out = run.layout.scores(entry.name)
    if score is not None and (run.done(scores_out) or (score.original == entry.name and done_keys)):
        score = None  # done; or the original resumed: this pass holds only some of the rows to score
    self_scored = score is not None and score.original == entry.name
    if expected - len(done_keys) > 0:
        import ray

        light = {"batch_format": "pyarrow", "num_cpus": LIGHT_TASK_CPUS}
        rows = prompts.map_batches(expand_samples, fn_kwargs={"samples": samples, "base_seed": seed},
                                   zero_copy_batch=True, **light)
        if done_keys:
            rows = rows.map_batches(_drop_done, fn_kwargs={"done_ref": ray.put(done_keys)}, **light)
        todo = expected - len(done_keys)
        if entry.reorder:
            rows = shuffled(rows, todo, shuffle_seed)
        kwargs = {"spec": spec, "sampling": sampling, "backend": backend}
        if self_scored:
            run.restart(scores_out)
            to_score = expected
            mode, bar = "self_scored", Bar(f"generate {entry.name} (and its scores)", expected)
            kwargs["topk"] = score.topk
        elif score is None:
            to_score = 0
            mode, bar = "generate", Bar(f"generate {entry.name}", expected, start=len(done_keys))
            kwargs["tolerate_load_failure"] = not entry.is_original
        else:
            run.restart(scores_out)
            to_score = run.count(run.layout.generations(score.original))
            rows = rows.map_batches(as_input, fn_kwargs={"task": "gen"}, **light).union(
                _original_rows(run, score.original, score.shuffle_seed if entry.reorder else None).map_batches(
                    as_input, fn_kwargs={"task": "score"}, **light))
            mode = "generate_and_score"
            bar = Bar(f"generate and score {entry.name}", expected + to_score, start=len(done_keys))
            kwargs.update(topk=score.topk, tolerate_load_failure=not entry.is_original)
        written, reports = run_engine_stage(
            rows, todo + to_score if mode == "generate_and_score" else todo, mode=mode, model=entry.name, where=where, what=f"model {entry.name!r}", bar=bar, out=out,
            scores_out=scores_out, before=len(done_keys), rows_per_file=rows_per_file, **kwargs)
        retries = {**reports[GENERATE], "engine_actors": where.num_actors}
        gen_written = [w for w in written if w.get("task", "gen") == "gen"]
        new_rows = sum(w["rows"] for w in gen_written)
        new_tokens = sum(w["output_tokens"] for w in gen_written)
        if self_scored:
            _finish_scores(run, entry, scores_out, to_score, time.perf_counter() - t0, where,
                           {"from_generation": True})
        elif score is not None:
            _finish_scores(run, entry, scores_out, to_score, time.perf_counter() - t0, where,
                           {**reports[SCORE], "shared_engine_with_generation": True})
    counts = run.verify(out, expected, what, fold=stage_counts)
    wall = time.perf_counter() - t0
    accelerator, accelerator_s = accelerator_seconds(where, spec, wall if new_rows else 0.0)
    run.finish(out, GenerationsDone(wall_s=wall, new_rows=new_rows, new_output_tokens=new_tokens, retries=retries,
                                    accelerator=accelerator, accelerator_s=accelerator_s))
    return ModelStats(model=entry.name, prompts=n_prompts, samples=samples, wall_s=wall, new_rows=new_rows,
                      new_output_tokens=new_tokens, retries=retries, accelerator=accelerator,
                      accelerator_s=accelerator_s, **counts)


def stage_score(run: Run, *, entry: ModelEntry, original: str, spec: EngineSpec, topk: int, where: Placement,
                shuffle_seed: int, rows_per_file: int, backend=None) -> ScoresDone:
    """Score the original's outputs with `entry`'s engine (teacher-forced). An unfinished stage is
    redone whole: scoring costs less than generating."""
    out = run.layout.scores(entry.name)
    if run.done(out):
        return run.marker(out, ScoresDone)
    run.restart(out)
    expected = run.count(run.layout.generations(original))
    t0 = time.perf_counter()
    _, reports = run_engine_stage(
        _original_rows(run, original, shuffle_seed if entry.reorder else None), expected, mode="score", model=entry.name,
        where=where, what=f"scorer {entry.name!r}", bar=Bar(f"score {entry.name}", expected), out=out,
        rows_per_file=rows_per_file, spec=spec, topk=topk, tolerate_load_failure=not entry.is_original,
        backend=backend)
    return _finish_scores(run, entry, out, expected, time.perf_counter() - t0, where, reports[SCORE])


def stage_kld(run: Run, *, entry: ModelEntry, original: EngineSpec, spec: EngineSpec, where: Placement,
              rows_per_file: int, backend=None, route: str = "lists") -> ScoresDone:
    """`entry`'s exact per-token KLD against the original over the original's outputs
    (cousins/engine/kld_actor.py; kld/model=NAME), by `route` (hidden states or vLLM's lists). An
    unfinished stage is redone whole, as scoring is."""
    out = run.layout.kld(entry.name)
    if run.done(out):
        return run.marker(out, ScoresDone)
    run.restart(out)
    expected = run.count(run.layout.generations(original.model_name))
    t0 = time.perf_counter()
    _, reports = run_engine_stage(
        _original_rows(run, original.model_name), expected, mode="kld", model=entry.name, where=where,
        what=f"exact KLD of {entry.name!r}", bar=Bar(f"exact KLD {entry.name}", expected), out=out,
        rows_per_file=rows_per_file, original=original, cousin=spec, tolerate_load_failure=not entry.is_original,
        backend=backend, reorder=entry.reorder, route=route)
    return _finish_scores(run, entry, out, expected, time.perf_counter() - t0, where, reports[KLD],
                          what="exact KLD")


def _finish_scores(run: Run, entry: ModelEntry, out: Location, expected: int, wall_s: float, where: Placement,
                   retries: dict, what: str = "scores") -> ScoresDone:
    c = run.verify(out, expected, f"{what} of {entry.name!r}", ["engine_time_s", "error"], fold=stage_counts)
    done = ScoresDone(rows=c["rows"], error_rows=c["error_rows"], engine_s=c["engine_s"], wall_s=wall_s,
                      batch_size=where.batch_size, reordered=entry.reorder, retries=retries)
    run.finish(out, done)
    return done
