"""Read committed runs: the one backend of `cousins query` and of the query service (services/),
with the drift queries (`cousins.query.drift`) and the prompt view (`cousins.query.prompt`) built on
it; plain functions over a storage root (a `Location`): no Ray, no web framework, and nothing here
writes. It owns listing the runs (committed ones, and with state="all" runs in progress and failed
runs, with their stages published, part files so far and last update), one run's listing entry,
manifest, config and report, and what every query shares: `committed_run` (a run exists for these
functions only once `{root}/runs/{id}/manifest.json` holds status "committed"; a run being written,
or one that failed, is answered NotFound like a run that does not exist, saying what it is),
`reads_run_data` (errors decoding a run's stored files become `Damaged`), `clean` (JSON-safe
answers) and `dataset` (a pyarrow dataset over an explicit file list). Every run id is checked
against the one name pattern before it is joined to the root; request input and query errors are
`cousins.query.inputs`', CLI text views `cousins.query.render`'s.
"""

from __future__ import annotations

import json
import math
import posixpath
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from cousins.query.inputs import BadInput, Damaged, NotFound, QueryError, Unavailable, check_name, is_name
from cousins.run.lifecycle import NotCommitted, committed
from cousins.run.layout import RunLayout, is_part, runs_dir
from cousins.run.storage import SUCCESS, Location

# --- runs ------------------------------------------------------------------------------------------


def clean(obj: Any) -> Any:
    """JSON-safe: NaN and infinities become null (JSON has neither), datetimes ISO strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


def _check_root(root: Location) -> None:
    """Unavailable when the storage root itself does not exist (answered instead of 'no runs'):
    a local directory, or an object store's bucket (its prefixes exist only while objects do)."""
    local = "://" not in root.url or root.url.startswith("file://")
    where = root.path if local else root.path.split("/", 1)[0]
    root.fs.invalidate_cache(where)
    if not root.fs.exists(where):
        raise Unavailable(f"the storage root {root.url} does not exist (not mounted, or removed); "
                          f"nothing can be read from it")


def committed_run(root: Location, run_id: str) -> tuple[RunLayout, dict]:
    """(layout, manifest) of a committed run; for any other run NotFound, saying what it is (or
    Unavailable when the storage root itself is gone)."""
    try:
        run = committed(root, check_name(run_id, "run id"))
    except NotCommitted:
        _check_root(root)
        layout = RunLayout(root, run_id)
        status, _ = _state_of(layout)
        if status == "in progress" and not layout.config.exists():
            raise NotFound(f"no committed run {run_id!r}; `cousins query runs` (or GET /runs) lists them") from None
        p = _progress(layout)
        raise NotFound(f"no committed run {run_id!r}: it is {status} (stages published: "
                       f"{', '.join(p['stages_done']) or 'none'}; last update {p['updated'] or 'unknown'}); "
                       f"`cousins query runs --all` (GET /runs?state=all) lists such runs") from None
    return run.layout, run.manifest


def _mtime(info: dict) -> str | None:
    t = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if isinstance(t, (int, float)):
        t = datetime.fromtimestamp(t, tz=timezone.utc)
    return t.isoformat() if isinstance(t, datetime) else (str(t) if t is not None else None)


def _created(layout: RunLayout) -> str | None:
    """When the run started: config.yaml is the first file a run writes."""
    try:
        return _mtime(layout.config.fs.info(layout.config.path))
    except (FileNotFoundError, OSError):
        return None


def _run_entry(layout: RunLayout, manifest: dict) -> dict:
    models = manifest.get("models") or []
    counts = manifest.get("row_counts") or {}
    return clean({
        "run_id": layout.run_id,
        "status": manifest.get("status"),
        "created": _created(layout),
        "committed": manifest.get("committed"),
        "kind": "drift" if manifest.get("drift") is not None else "generate",
        "models": [{"name": m.get("name"), "kind": m.get("kind")} for m in models if isinstance(m, dict)],
        "prompts": (manifest.get("corpus") or {}).get("prompts"),
        "samples": manifest.get("samples"),
        "rows": {name: c.get("rows") for name, c in counts.items() if isinstance(c, dict)},
        "error_rows": {name: c.get("error_rows") for name, c in counts.items() if isinstance(c, dict)},
    })


def reads_run_data(fn):
    """Errors from decoding a run's stored files (Parquet, JSON, YAML, text) become `Damaged`,
    naming the run and the error (Arrow names the file); requests and missing runs keep theirs."""
    import functools

    @functools.wraps(fn)
    def wrapper(root, run_id, *args, **kwargs):
        try:
            return fn(root, run_id, *args, **kwargs)
        except QueryError:
            raise
        except (pa.ArrowInvalid, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:  # not OSError: outages
            raise Damaged(f"run {run_id!r} has damaged data: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e
        except Exception as e:
            if type(e).__module__.startswith("yaml"):
                raise Damaged(f"run {run_id!r} has a damaged config.yaml: {type(e).__name__}") from e
            raise

    return wrapper


RUN_STATES = ("committed", "all")


def _state_of(layout: RunLayout) -> tuple[str, dict | None]:
    """(state, manifest): committed (with its manifest), damaged (a manifest that cannot be read as
    JSON or is not an object), the status a manifest says (e.g. failed), or in progress (none yet)."""
    loc = layout.manifest
    try:
        loc.fs.invalidate_cache(loc.path)
        raw = loc.fs.cat_file(loc.path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "in progress", None
    try:
        manifest = json.loads(raw)
    except ValueError:
        return "damaged", None
    if not isinstance(manifest, dict):
        return "damaged", None
    status = manifest.get("status")
    return ("committed", manifest) if status == "committed" else (str(status or "in progress"), None)


def _progress(layout: RunLayout) -> dict:
    """A run that is not committed, from one recursive listing: the stages published (their
    `_SUCCESS`), the part files written so far per stage and the last update."""
    fs, base = layout.run.fs, layout.run.path.rstrip("/")
    try:
        fs.invalidate_cache(base)
        files = fs.find(base, detail=True)
    except (FileNotFoundError, OSError):
        files = {}
    done, parts, last = set(), {}, None
    for path, info in files.items():
        rel = path[len(base):].lstrip("/")
        stage, _, name = rel.rpartition("/")
        if name == SUCCESS:
            done.add(stage)
        elif is_part(name):
            parts[stage] = parts.get(stage, 0) + 1
        t = _mtime(info)
        last = t if t and (last is None or t > last) else last
    return {"stages_done": sorted(done), "parts": dict(sorted(parts.items())), "updated": last}


def list_runs(root: Location, state: str = "committed") -> list[dict]:
    """Every committed run under `root`, newest commit first: id, status, created and committed
    times, kind (generate or drift), models, prompts, samples, and rows per model. A committed
    run whose manifest cannot be read is listed as damaged, never hiding the others. With
    state="all", runs in progress and failed runs too, with their stages done, parts so far and
    last update."""
    if state not in RUN_STATES:
        raise BadInput(f"unknown state {state!r}; choose one of {list(RUN_STATES)}")
    runs = runs_dir(root)
    fs = root.fs
    fs.invalidate_cache(runs.path)
    try:
        entries = fs.ls(runs.path, detail=True)
    except FileNotFoundError:
        _check_root(root)
        return []  # a store with no run yet
    layouts = [RunLayout(root, posixpath.basename(e["name"].rstrip("/"))) for e in entries
               if e.get("type") == "directory"]
    layouts = [lay for lay in layouts if is_name(lay.run_id)]

    def one(layout: RunLayout) -> dict | None:
        status, manifest = _state_of(layout)
        if manifest is not None:
            try:
                return _run_entry(layout, manifest)
            except Exception as e:  # noqa: BLE001 - a manifest of the wrong shape: damaged, listed as such
                return _other_entry(layout, "damaged", f"manifest.json does not read as a manifest: "
                                                       f"{type(e).__name__}")
        if status == "damaged":
            return _other_entry(layout, "damaged", "manifest.json is not a JSON object")
        return _other_entry(layout, status, None, _progress(layout)) if state == "all" else None

    with ThreadPoolExecutor(max_workers=8) as pool:  # object stores: one GET per run, overlapped
        runs = [r for r in pool.map(one, layouts) if r is not None]
    return sorted(runs, key=lambda r: (r.get("committed") or r.get("updated") or "", r["run_id"]), reverse=True)


def _other_entry(layout: RunLayout, status: str, detail: str | None, progress: dict | None = None) -> dict:
    return clean({"run_id": layout.run_id, "status": status, "created": _created(layout), "committed": None,
                   "kind": None, "models": [], "prompts": None, "samples": None, "rows": {}, "error_rows": {},
                   **({"detail": detail} if detail else {}), **(progress or {})})


@reads_run_data
def get_run(root: Location, run_id: str) -> dict:
    """One committed run: its listing entry and its whole manifest."""
    layout, manifest = committed_run(root, run_id)
    return {**_run_entry(layout, manifest), "manifest": clean(manifest)}


@reads_run_data
def get_manifest(root: Location, run_id: str) -> dict:
    return clean(committed_run(root, run_id)[1])


@reads_run_data
def get_config(root: Location, run_id: str) -> dict:
    """The run's resolved config (config.yaml, secrets already masked by the job) as a mapping."""
    import yaml

    layout, _ = committed_run(root, run_id)
    try:
        text = layout.config.read_text()
    except FileNotFoundError:
        raise NotFound(f"run {run_id!r} has no config.yaml") from None
    return clean(yaml.safe_load(text) or {})


@reads_run_data
def get_report(root: Location, run_id: str) -> bytes:
    """The run's self-contained report.html (drift runs)."""
    layout, _ = committed_run(root, run_id)
    try:
        return layout.report.fs.cat_file(layout.report.path)
    except FileNotFoundError:
        raise NotFound(f"run {run_id!r} has no report.html (only drift runs have one)") from None


# --- reading a run's Parquet -----------------------------------------------------------------------


def dataset(root: Location, files: list[str], schema_: pa.Schema) -> ds.Dataset:
    """A pyarrow dataset over exactly these Parquet files of the run (never hive discovery)."""
    # An explicit schema: files of an older run that lack a column read it as null.
    return ds.dataset(files, schema=schema_, format="parquet", filesystem=root.arrow_fs())
