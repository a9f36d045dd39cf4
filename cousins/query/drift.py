"""The drift of a committed drift run: its summary (every cousin's figures with CIs and the noise
floor, or one cousin's beside the noise floor and the run's capability-against-cost plane), the
cousins that have drift rows, and pages of drift rows, filtered and sorted. Every cousin name is
checked against the one name pattern before it becomes part of a path, and sort and filter fields
come from allow-lists of the DRIFT schema: no user text is ever evaluated or used as a path. A page
of drift rows costs two passes over a pyarrow dataset built from explicit file lists (`part_files`'
rule; never hive discovery, whose `model=`/`cousin=` keys would clash with the columns of those
names): the first streams only the filter and sort columns with the filter pushed down and keeps
the best `offset + limit` keys with the file each came from, the second reads the page's rows with
the requested columns from those files only. Memory follows the page and the key columns, never the
size of the run.
"""

from __future__ import annotations

import json
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from cousins.contract import schema
from cousins.query.inputs import (DEFAULT_LIMIT, MAX_LIMIT, MAX_OFFSET, BadInput, NotFound, check_name, check_number,
                                   check_text)
from cousins.query.runs import clean, committed_run, dataset, reads_run_data
from cousins.run.layout import DRIFT
from cousins.run.storage import Location

# --- allow-lists ----------------------------------------------------------------------------------

_BATCH = 65_536
# Scalar drift columns are the default projection of a page; the per-token lists are opt-in.
ROW_COLUMNS = tuple(f.name for f in schema.DRIFT if not pa.types.is_list(f.type))
DRIFT_FIELDS = tuple(schema.DRIFT.names)
METRICS = tuple(f.name for f in schema.DRIFT if pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
SORT_FIELDS = tuple(n for n in ROW_COLUMNS if n not in ("original_text", "cousin_text", "error"))
_TIE = ("cousin", "prompt_id", "sample_index")  # a total order: pages never overlap or skip rows


# --- drift summary ---------------------------------------------------------------------------------


@reads_run_data
def get_summary(root: Location, run_id: str, cousin: str | None = None) -> dict:
    """summary.json of a drift run: every cousin's figures with CIs, and the noise floor. With
    `cousin`, that cousin's entry (or the noise floor's) beside the noise floor, with the run's
    capability-against-cost plane (every model: the frontier is a comparison of them all)."""
    layout, _ = committed_run(root, run_id)
    if cousin is not None:
        check_name(cousin, "cousin")
    try:
        summary = json.loads(layout.summary.read_text())
    except FileNotFoundError:
        raise NotFound(f"run {run_id!r} has no drift summary: it is not a drift run") from None
    summary = clean(summary)
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


@reads_run_data
def list_cousins(root: Location, run_id: str) -> list[str]:
    """The cousins (noise floor included) that have drift rows in a committed drift run."""
    layout, manifest = committed_run(root, run_id)
    _need_drift(run_id, manifest)
    return sorted(layout.parts_by_name(DRIFT))


def _need_drift(run_id: str, manifest: dict) -> None:
    """NotFound, saying so, for a run that is not a drift run (an empty page would look like no drift)."""
    if not manifest.get("drift"):
        raise NotFound(f"run {run_id!r} is not a drift run: it has no cousins and no drift rows")


# --- drift rows ------------------------------------------------------------------------------------


@reads_run_data
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
    layout, manifest = committed_run(root, run_id)
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

    by_cousin = layout.parts_by_name(DRIFT)
    if cousin is not None and cousin not in by_cousin:
        raise NotFound(f"run {run_id!r} has no drift rows for cousin {cousin!r}; its cousins: {sorted(by_cousin)}")
    files = [f for c, fs in by_cousin.items() if cousin is None or c == cousin for f in fs]
    page = {"run_id": run_id, "total": 0, "offset": offset, "limit": limit, "sort": sort,
            "order": "desc" if descending else "asc", "rows": []}
    if not files:
        return page
    data = dataset(root, files, schema.DRIFT)

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
    found = dataset(root, page_files, schema.DRIFT).to_table(columns=columns, filter=rows_expr).to_pylist()
    by_key = {(r["cousin"], r["prompt_id"], r["sample_index"]): r for r in found}
    page["rows"] = [_clean_row(by_key[key], columns)
                    for key in zip(*(wanted.column(k).to_pylist() for k in _TIE)) if key in by_key]
    return page


def _clean_row(row: dict, columns: list[str]) -> dict:
    return {k: (clean(v) if isinstance(v, (float, list)) else v) for k, v in row.items() if k in columns}


def _best(best: pa.Table | None, batches: list[pa.RecordBatch], order: list, need: int) -> pa.Table | None:
    if not batches:
        return best
    table = pa.Table.from_batches(batches)
    if best is not None:
        table = pa.concat_tables([best, table])
    return table.sort_by(order).slice(0, need)

