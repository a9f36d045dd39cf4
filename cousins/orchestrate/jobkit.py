"""The skeleton every run job shares: config errors and run conflicts reported before any cluster
work, then Ray, then the job's body; a failure ends with the resume command."""

from __future__ import annotations

import sys
import traceback
from typing import Callable, TypeVar

from cousins.contract.config import Config, ConfigError
from cousins.contract.validate import validate
from cousins.engine.plan import same_as_original
from cousins.family.prepare import check_vocabularies, prepare_before_ray
from cousins.orchestrate.pipeline import build_students, open_run
from cousins.run.corpus import NoUsablePrompt
from cousins.run.lifecycle import Run, RunConflict
from cousins.run.runtime import init_ray, root_cause

T = TypeVar("T")


def typed(dcfg) -> Config:
    """The composed Hydra config as the typed Config; exits with every missing or bad value at once."""
    from cousins.contract.config import to_config

    try:
        return to_config(dcfg)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def start(cfg: Config, *, scoring: bool = False, names: dict[str, str] | None = None,
          problems: list[str] = ()) -> Run:
    """Validate (every config error at once), build absent models, open the run (an existing run id
    resumes; with a different config it is refused). Exits with the message on any of those.
    `scoring`: the drift job (its cousins are teacher-forced); `names`: config keys as the user
    wrote them, for keys the job made (the audit's target is its run's cousin `target`);
    `problems`: the job's own config problems, reported with validate's."""
    try:
        try:
            validate(cfg)
        except ConfigError as e:
            raise ConfigError([*problems, *e.problems]) from None
        if problems:
            raise ConfigError(list(problems))
        prepare_before_ray(cfg, scoring=scoring)  # builds, vocabularies, every model's settings, templates
        for name in same_as_original(cfg):
            print(f"note: cousin {name!r} is the original as the engine runs it (same checkpoint and engine "
                  f"settings): its drift measures the engine's own noise, like the noise floor", flush=True)
        return open_run(cfg)
    except ConfigError as e:
        found = e.problems
        for made, written in (names or {}).items():
            found = [p.replace(made, written) for p in found]
        sys.exit(f"error: {ConfigError(found)}")
    except RunConflict as e:
        sys.exit(f"error: {e}")


def storage_problem(cfg: Config, timeout_s: float = 20.0) -> str | None:
    """None when the run's storage root answers a listing; else the root, its endpoint and the error."""
    import concurrent.futures
    import os

    from cousins.run.storage import resolve

    opts = cfg.storage.options or {}
    endpoint = (opts.get("client_kwargs") or {}).get("endpoint_url") or opts.get("endpoint_url") \
        or os.environ.get("AWS_ENDPOINT_URL")
    where = cfg.storage.root + (f" (endpoint {endpoint})" if endpoint and "://" in cfg.storage.root else "")

    def probe() -> None:
        loc = resolve(cfg.storage.root, **opts)
        loc.fs.invalidate_cache()
        if not loc.fs.exists(loc.path):
            raise FileNotFoundError(f"{loc.url} does not exist any more")

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pool.submit(probe).result(timeout=timeout_s)
        return None
    except concurrent.futures.TimeoutError:
        return f"{where}: no answer within {timeout_s:.0f} s"
    except Exception as e:  # noqa: BLE001 - whatever the storage says is the answer
        return f"{where}: {root_cause(e)}"
    finally:
        pool.shutdown(wait=False)


def execute(cfg: Config, run: Run, body: Callable[[], T]) -> T:
    """Connect to Ray, train absent distilled cousins (they learn from teacher data first), run the
    body. Any failure prints its story and ends with what to do next."""
    init_ray(cfg.ray, cfg.log)
    try:
        build_students(cfg, run.run_id)
        check_vocabularies(cfg)  # distilled cousins built just now included
        return body()
    except NoUsablePrompt as e:  # the input's fault: a rerun as it is cannot fix it, so no resume advice
        sys.exit(f"error: {e}")
    except Exception as e:
        traceback.print_exc()  # the whole story for the log; the last line says what to do next
        why = root_cause(e)
        gone = storage_problem(cfg)  # Ray's wrapping hides a storage error: ask the storage itself
        if gone:
            why = f"the storage is unreachable: {gone} (the run's first error: {why})"
        sys.exit(f"error: run {run.run_id} failed: {why}\n"
                 f"Nothing of it is committed; rerun with the same run.run_id={run.run_id} to resume"
                 f"{' once the storage answers again' if gone else ''}.")
