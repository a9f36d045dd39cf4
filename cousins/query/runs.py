"""Read committed runs: the one backend of `cousins query` and of the query service (services/).

Plain functions over a storage root (a `Location`): no Ray, no web framework, and nothing here
writes. A run exists for these functions only once `{root}/runs/{id}/manifest.json` holds status
"committed"; a run being written, or one that failed, is reported exactly like a run that does not
exist.

Every name that becomes part of a path (run id, cousin, model) is checked against one pattern
before it is joined to the root, and sort and filter fields come from allow-lists of the DRIFT
schema: no user text is ever evaluated or used as a path.

A page of drift rows costs two passes over a pyarrow dataset built from explicit file lists
(`data_files`' rule; never hive discovery, whose `model=`/`cousin=` keys would clash with the
columns of those names): the first streams only the filter and sort columns with the filter pushed down and
keeps the best `offset + limit` keys with the file each came from, the second reads the page's rows
with the requested columns from those files only. Memory follows the page and the key columns, never the size of the run.

Request input and query errors: `cousins.query.inputs`; CLI text views: `cousins.query.render`.
"""

from __future__ import annotations

import json
import math
import posixpath
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from cousins.contract import schema
from cousins.query.inputs import (DEFAULT_LIMIT, MAX_LIMIT, MAX_OFFSET, BadInput, Damaged, NotFound, QueryError,
                                   Unavailable, check_name, check_number, check_text, is_name)
from cousins.run.lifecycle import NotCommitted, committed
from cousins.run.storage import Location, RunLayout, data_files

# --- allow-lists ----------------------------------------------------------------------------------

_BATCH = 65_536
# Scalar drift columns are the default projection of a page; the per-token lists are opt-in.
LIST_COLUMNS = tuple(f.name for f in schema.DRIFT if pa.types.is_list(f.type))
ROW_COLUMNS = tuple(f.name for f in schema.DRIFT if not pa.types.is_list(f.type))
DRIFT_FIELDS = tuple(schema.DRIFT.names)
METRICS = tuple(f.name for f in schema.DRIFT if pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
SORT_FIELDS = tuple(n for n in ROW_COLUMNS if n not in ("original_text", "cousin_text", "error"))
_TIE = ("cousin", "prompt_id", "sample_index")  # a total order: pages never overlap or skip rows


# --- runs ------------------------------------------------------------------------------------------


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN and infinities become null (JSON has neither), datetimes ISO strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
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


def _committed(root: Location, run_id: str) -> tuple[RunLayout, dict]:
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
    return _clean({
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


def _reads_run_data(fn):
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
        if name == "_SUCCESS":
            done.add(stage)
        elif name.endswith(".parquet") and not name.startswith((".", "_")):
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
    runs_dir = root.join("runs")
    fs = root.fs
    fs.invalidate_cache(runs_dir.path)
    try:
        entries = fs.ls(runs_dir.path, detail=True)
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
    return _clean({"run_id": layout.run_id, "status": status, "created": _created(layout), "committed": None,
                   "kind": None, "models": [], "prompts": None, "samples": None, "rows": {}, "error_rows": {},
                   **({"detail": detail} if detail else {}), **(progress or {})})


@_reads_run_data
def get_run(root: Location, run_id: str) -> dict:
    """One committed run: its listing entry and its whole manifest."""
    layout, manifest = _committed(root, run_id)
    return {**_run_entry(layout, manifest), "manifest": _clean(manifest)}


@_reads_run_data
def get_manifest(root: Location, run_id: str) -> dict:
    return _clean(_committed(root, run_id)[1])


@_reads_run_data
def get_config(root: Location, run_id: str) -> dict:
    """The run's resolved config (config.yaml, secrets already masked by the job) as a mapping."""
    import yaml

    layout, _ = _committed(root, run_id)
    try:
        text = layout.config.read_text()
    except FileNotFoundError:
        raise NotFound(f"run {run_id!r} has no config.yaml") from None
    return _clean(yaml.safe_load(text) or {})


@_reads_run_data
def get_report(root: Location, run_id: str) -> bytes:
    """The run's self-contained report.html (drift runs)."""
    layout, _ = _committed(root, run_id)
    try:
        return layout.report.fs.cat_file(layout.report.path)
    except FileNotFoundError:
        raise NotFound(f"run {run_id!r} has no report.html (only drift runs have one)") from None


# --- drift summary ---------------------------------------------------------------------------------


@_reads_run_data
def get_summary(root: Location, run_id: str, cousin: str | None = None) -> dict:
    """summary.json of a drift run: every cousin's figures with CIs, and the noise floor. With
    `cousin`, that cousin's entry (or the noise floor's) beside the noise floor, with the run's
    capability-against-cost plane (every model: the frontier is a comparison of them all)."""
    layout, _ = _committed(root, run_id)
    if cousin is not None:
        check_name(cousin, "cousin")
    try:
        summary = json.loads(layout.summary.read_text())
    except FileNotFoundError:
        raise NotFound(f"run {run_id!r} has no drift summary: it is not a drift run") from None
    summary = _clean(summary)
    if cousin is None:
        return summary
    noise = summary.get("noise_floor")
    entries = [*summary.get("cousins", []), *([noise] if noise else [])]
    found = next((c for c in entries if c.get("name") == cousin), None)
    if found is None:
        names = [c.get("name") for c in entries]
        raise NotFound(f"run {run_id!r} has no cousin {cousin!r}; its cousins: {names}")
    keep = ("run_id", "original", "score_topk", "prompts", "bootstrap", "kld_bound", "plane")
    warnings = [w for w in summary.get("warnings") or [] if w.startswith(f"{cousin}: ")]
    return {**{k: summary.get(k) for k in keep}, "cousin": found, "noise_floor": noise, "warnings": warnings}


@_reads_run_data
def list_cousins(root: Location, run_id: str) -> list[str]:
    """The cousins (noise floor included) that have drift rows in a committed drift run."""
    layout, manifest = _committed(root, run_id)
    _need_drift(run_id, manifest)
    return sorted(_drift_files(layout))


def _need_drift(run_id: str, manifest: dict) -> None:
    """NotFound, saying so, for a run that is not a drift run (an empty page would look like no drift)."""
    if not manifest.get("drift"):
        raise NotFound(f"run {run_id!r} is not a drift run: it has no cousins and no drift rows")


def _drift_files(layout: RunLayout) -> dict[str, list[str]]:
    """Each cousin's drift part files, from ONE recursive listing of drift/ (one LIST on an object
    store, not one per cousin), by `data_files`' rule: Parquet files directly in `cousin=NAME/`
    whose names do not start with '_' or '.' (temporaries, markers)."""
    stage = layout.run.join("drift")
    stage.fs.invalidate_cache(stage.path)
    try:
        found = stage.fs.find(stage.path)
    except FileNotFoundError:
        return {}
    prefix = stage.path.rstrip("/") + "/"
    out: dict[str, list[str]] = {}
    for path in found:
        parts = path[len(prefix):].split("/") if path.startswith(prefix) else []
        if len(parts) != 2 or not parts[0].startswith("cousin="):
            continue
        cousin, name = parts[0].split("=", 1)[1], parts[1]
        if is_name(cousin):
            files = out.setdefault(cousin, [])
            if name.endswith(".parquet") and not name.startswith(("_", ".")):
                files.append(path)
    return {c: sorted(f) for c, f in sorted(out.items())}


def _dataset(root: Location, files: list[str], schema_: pa.Schema) -> ds.Dataset:
    # An explicit schema: files of an older run that lack a column read it as null.
    return ds.dataset(files, schema=schema_, format="parquet", filesystem=root.arrow_fs())


# --- drift rows ------------------------------------------------------------------------------------


@_reads_run_data
def drift_page(root: Location, run_id: str, *, cousin: str | None = None, category: str | None = None,
               metric: str = "kld_mean", min_value: float | None = None, max_value: float | None = None,
               flips_only: bool = False, errors: bool | None = None,
               sort: str = "kld_mean", descending: bool = True, limit: int = DEFAULT_LIMIT, offset: int = 0,
               fields: Iterable[str] | None = None) -> dict:
    """A page of drift rows, filtered and sorted; `total` counts every row the filter keeps.

    Filters (all optional, combined with AND): `cousin`, `category`, `metric` (default kld_mean)
    within [`min_value`, `max_value`], `flips_only` (rows whose correctness flipped), `errors` (True: only rows with an error; False: only rows without). Sorted by `sort`
    (nulls last), then cousin, prompt id and sample, so pages are stable. Top-N by KLD is the
    default: `sort="kld_mean", descending=True, limit=N`. `fields` picks columns (default: every
    non-list column; the per-token lists on request)."""
    layout, manifest = _committed(root, run_id)
    _need_drift(run_id, manifest)
    if cousin is not None:
        check_name(cousin, "cousin")
    check_text(category, "category")
    if metric not in METRICS:
        raise BadInput(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    min_value, max_value = check_number(min_value, "min"), check_number(max_value, "max")
    if sort not in SORT_FIELDS:
        raise BadInput(f"cannot sort by {sort!r}; choose one of {list(SORT_FIELDS)}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise BadInput(f"limit must be 1 to {MAX_LIMIT}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        raise BadInput(f"offset must be 0 to {MAX_OFFSET}; narrow the filter to reach further rows")
    columns = list(ROW_COLUMNS) if fields is None else list(dict.fromkeys(fields))
    unknown = [f for f in columns if f not in DRIFT_FIELDS]
    if unknown:
        raise BadInput(f"unknown fields {unknown[:5]}; choose from {list(DRIFT_FIELDS)}")
    columns = list(dict.fromkeys([*_TIE, *columns]))

    by_cousin = _drift_files(layout)
    if cousin is not None and cousin not in by_cousin:
        raise NotFound(f"run {run_id!r} has no drift rows for cousin {cousin!r}; its cousins: {sorted(by_cousin)}")
    files = [f for c, fs in by_cousin.items() if cousin is None or c == cousin for f in fs]
    page = {"run_id": run_id, "total": 0, "offset": offset, "limit": limit, "sort": sort,
            "order": "desc" if descending else "asc", "rows": []}
    if not files:
        return page
    data = _dataset(root, files, schema.DRIFT)

    expr = None
    def both(e):
        nonlocal expr
        expr = e if expr is None else (expr & e)
    if category is not None:
        both(ds.field("category") == category)
    if min_value is not None:
        both(ds.field(metric) >= min_value)
    if max_value is not None:
        both(ds.field(metric) <= max_value)
    if flips_only:
        both(ds.field("flip") == True)  # noqa: E712 - an Arrow expression, not a Python comparison
    if errors is not None:
        both(ds.field("error").is_valid() if errors else ds.field("error").is_null())

    order = [(sort, "descending" if descending else "ascending", "at_end"),
             *[(k, "ascending", "at_end") for k in _TIE if k != sort]]
    keys = list(dict.fromkeys([sort, *_TIE]))
    need = offset + limit
    paths = [f.path for f in data.get_fragments()]
    file_of = {p: i for i, p in enumerate(paths)}
    best: pa.Table | None = None
    pending: list[pa.RecordBatch] = []
    pending_rows = total = 0
    for tagged in data.scanner(columns=keys, filter=expr, batch_size=_BATCH).scan_batches():
        batch = tagged.record_batch
        if not batch.num_rows:
            continue
        # Remember each key's file, so the second pass opens only the files the page is in.
        where_from = pa.array([file_of[tagged.fragment.path]] * batch.num_rows, pa.int32())
        batch = pa.RecordBatch.from_arrays([*batch.columns, where_from], names=[*keys, "_file"])
        total += batch.num_rows
        pending.append(batch)
        pending_rows += batch.num_rows
        if pending_rows >= max(need, _BATCH):  # keep only the best `need` keys seen so far
            best = _best(best, pending, order, need)
            pending, pending_rows = [], 0
    best = _best(best, pending, order, need)
    page["total"] = total
    if best is None or best.num_rows <= offset:
        return page
    wanted = best.slice(offset, limit)
    page_files = [paths[i] for i in sorted(set(wanted.column("_file").to_pylist()))]
    rows_expr = (pc.field("prompt_id").isin(wanted.column("prompt_id").combine_chunks().unique())
                 & pc.field("cousin").isin(wanted.column("cousin").combine_chunks().unique()))
    if expr is not None:
        rows_expr = rows_expr & expr
    found = _dataset(root, page_files, schema.DRIFT).to_table(columns=columns, filter=rows_expr).to_pylist()
    by_key = {(r["cousin"], r["prompt_id"], r["sample_index"]): r for r in found}
    page["rows"] = [_clean_row(by_key[key], columns)
                    for key in zip(*(wanted.column(k).to_pylist() for k in _TIE)) if key in by_key]
    return page


def _clean_row(row: dict, columns: list[str]) -> dict:
    return {k: (_clean(v) if isinstance(v, (float, list)) else v) for k, v in row.items() if k in columns}


def _best(best: pa.Table | None, batches: list[pa.RecordBatch], order: list, need: int) -> pa.Table | None:
    if not batches:
        return best
    table = pa.Table.from_batches(batches)
    if best is not None:
        table = pa.concat_tables([best, table])
    return table.sort_by(order).slice(0, need)


# --- one prompt across models ----------------------------------------------------------------------

_GEN_COLUMNS = ["prompt_id", "sample_index", "model", "seed", "output_text", "finish_reason",
                "output_tokens", "error"]
_VS_COLUMNS = ["cousin", "sample_index", "exact_match", "first_divergence", "div_original_start",
               "div_original_end", "div_cousin_start", "div_cousin_end", "kld_mean", "same_top1", "chrf",
               "length_ratio", "correct_original", "correct_cousin", "flip", "error"]


@_reads_run_data
def prompt_view(root: Location, run_id: str, prompt_id: str, *, sample_index: int | None = None) -> dict:
    """One prompt's generations by every model of the run, side by side, each sample in turn.

    For a drift run every cousin's generation carries `vs_original`: its drift row's figures and
    the first divergence, as the token index and the character spans [start, end) of the first
    divergent token in the original's text and in the cousin's."""
    layout, manifest = _committed(root, run_id)
    check_text(prompt_id, "prompt id")
    if sample_index is not None and (isinstance(sample_index, bool) or not isinstance(sample_index, int)
                                     or not 0 <= sample_index < 2**31):
        raise BadInput("sample_index must be a non-negative integer")
    prompts = data_files(layout.prompts)
    where = ds.field("prompt_id") == prompt_id
    found = _dataset(root, prompts, schema.PROMPTS).to_table(filter=where).to_pylist() if prompts else []
    if not found:
        raise NotFound(f"run {run_id!r} has no prompt {prompt_id!r}")
    prompt = found[0]

    models = [m for m in manifest.get("models") or [] if isinstance(m, dict) and is_name(m.get("name"))]
    order = {m["name"]: i for i, m in enumerate(models)}
    kinds = {m["name"]: m.get("kind") for m in models}
    original = models[0]["name"] if models else None
    gen_files = [f for m in models for f in data_files(layout.generations(m["name"]))]
    if sample_index is not None:
        where = where & (ds.field("sample_index") == sample_index)
    gens = (_dataset(root, gen_files, schema.GENERATIONS).to_table(columns=_GEN_COLUMNS, filter=where).to_pylist()
            if gen_files else [])
    drift_files = [f for fs in _drift_files(layout).values() for f in fs]
    vs = (_dataset(root, drift_files, schema.DRIFT).to_table(columns=_VS_COLUMNS, filter=where).to_pylist()
          if drift_files else [])
    vs_by = {(r["cousin"], r["sample_index"]): r for r in vs}

    samples: dict[int, list[dict]] = {}
    for g in sorted(gens, key=lambda g: (g["sample_index"], order.get(g["model"], len(order)), g["model"])):
        d = vs_by.get((g["model"], g["sample_index"]))
        entry = {"model": g["model"], "kind": kinds.get(g["model"]),
                 **{k: g[k] for k in ("seed", "output_text", "finish_reason", "output_tokens", "error")},
                 "vs_original": None}
        if d is not None:
            entry["vs_original"] = {
                **{k: d[k] for k in ("exact_match", "first_divergence", "kld_mean", "same_top1", "chrf",
                                     "length_ratio", "correct_original", "correct_cousin", "flip", "error")},
                "original_span": _span(d["div_original_start"], d["div_original_end"]),
                "cousin_span": _span(d["div_cousin_start"], d["div_cousin_end"]),
            }
        samples.setdefault(g["sample_index"], []).append(entry)
    return _clean({
        "run_id": run_id, "original": original,
        "prompt": {k: prompt[k] for k in ("prompt_id", "messages", "category", "reference")},
        "samples": [{"sample_index": i, "generations": samples[i]} for i in sorted(samples)],
    })


def _span(start, end) -> list[int] | None:
    return None if start is None or end is None else [start, end]
