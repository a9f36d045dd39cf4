"""The export itself: a committed run's generations of one model as distillation data, SFT chats
(optionally with the teacher's top-k logprobs for logit distillation, KD), filtered, deduplicated,
sharded, with a dataset card; `export(ExportConfig(run_id=..., kd=True))` writes
`{run}/distill/{sft|kd}/part-*.parquet` (or .jsonl) and README.md. It checks the input before any
Ray work, runs the filters of `cousins.export.filters` as Ray Data operations (hash-partitioned by
prompt, dedup key or LSH band), has the workers build the export rows of each partition and write
them in files of at most `rows_per_file` rows named by their keys, and leaves the driver only counts
and file names; it then publishes the stage (`_SUCCESS`) and the card of `cousins.export.card`.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from cousins.contract import schema
from cousins.contract.codec import encode
from cousins.contract.records import ExportDone, ExportFile
from cousins.export.card import dataset_card
from cousins.export.config import KD, SFT, ExportConfig, ExportError, ExportResult, FiltersConfig
from cousins.export.filters import (DERIVED, KEYS, PROMPT_INFO, VERDICT, band_duplicates, band_rows,
                                    check_filters, mark_exact, mark_near_and_best, numeric_fields,
                                    prompt_info, reports, verdicts)
from cousins.run.lifecycle import NotCommitted, Run, committed
from cousins.run.progress import Bar
from cousins.run.removal import EXPORT, NotOurs, check_ours, publish_dir, scratch
from cousins.run.storage import Location, mark_done, parquet_bytes, resolve

# --- what the export reads -----------------------------------------------------------------------

GEN_COLUMNS = ["prompt_id", "sample_index", "model", "category", "prompt_text", "output_text",
               "output_token_ids", "output_logprobs", "finish_reason", "prompt_tokens", "output_tokens",
               "engine_time_s", "error"]
KD_COLUMNS = ["topk_token_ids", "topk_logprobs"]


# --- the export ----------------------------------------------------------------------------------

def _rows(gens: pa.Table, prompts: pa.Table, kd: bool, teacher: str) -> pa.Table:
    by_id = {r["prompt_id"]: r for r in prompts.select(["prompt_id", "messages", "reference"]).to_pylist()}
    cols: dict[str, list] = {f.name: [] for f in (KD if kd else SFT)}
    d = gens.to_pydict()
    for i, pid in enumerate(d["prompt_id"]):
        p = by_id[pid]
        cols["prompt_id"].append(pid)
        cols["sample_index"].append(d["sample_index"][i])
        cols["messages"].append([*p["messages"], {"role": "assistant", "content": d["output_text"][i]}])
        cols["category"].append(d["category"][i])
        cols["reference"].append(p["reference"])
        cols["teacher"].append(teacher)
        cols["prompt_text"].append(d["prompt_text"][i])
        cols["finish_reason"].append(d["finish_reason"][i])
        cols["output_tokens"].append(d["output_tokens"][i])
        if kd:
            cols["token_ids"].append(d["output_token_ids"][i])
            cols["topk_token_ids"].append(d["topk_token_ids"][i])
            cols["topk_logprobs"].append(d["topk_logprobs"][i])
    return pa.Table.from_pydict(cols, schema=KD if kd else SFT)


FILES = pa.schema([("name", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()), ("tokens", pa.int64()),
                   ("first", pa.string())])
ROWS_PER_PARTITION = {"sft": 20_000, "kd": 2_000}  # a partition's rows in memory: top-k lists are heavy


def _write_partition(block: pa.Table, *, schemas: dict, out: Location, kd: bool, teacher: str, fmt: str,
                     rows_per_file: int) -> pa.Table:
    """Build one partition's export rows from its generations, prompts and kept keys, and write them
    in files of at most `rows_per_file` rows, named by their keys; returns FILES rows."""
    from cousins.run.dataops import split
    from cousins.run.ledger import batch_key

    sides = split(block, schemas)
    keep = set(zip(sides["keep"].column("prompt_id").to_pylist(), sides["keep"].column("sample_index").to_pylist()))
    gens = sides["gen"]
    gens = gens.filter(pa.array([k in keep for k in zip(gens.column("prompt_id").to_pylist(),
                                                        gens.column("sample_index").to_pylist())], pa.bool_()))
    gens = gens.sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    table = _rows(gens, sides["prompt"], kd, teacher)
    files = []
    for start in range(0, table.num_rows, rows_per_file):
        part = table.slice(start, rows_per_file)
        name = f"part-{batch_key(part)}.{fmt}"
        data = _encode(part, fmt)
        out.join(name).write_bytes_atomic(data)
        files.append({"name": name, "rows": part.num_rows, "bytes": len(data),
                      "tokens": int(pc.sum(part.column("output_tokens")).as_py() or 0),
                      "first": f"{part.column('prompt_id')[0].as_py()}\0{part.column('sample_index')[0].as_py():09d}"})
    return pa.Table.from_pylist(files, schema=FILES)


def _verdict_partition(block: pa.Table, *, schemas: dict, filters: FiltersConfig) -> pa.Table:
    from cousins.run.dataops import split

    sides = split(block, schemas)
    return verdicts(sides["gen"], sides["prompt"], filters)


def _near_and_best_partition(block: pa.Table, *, schemas: dict, filters: FiltersConfig) -> pa.Table:
    from cousins.run.dataops import split

    sides = split(block, schemas)
    return mark_near_and_best(sides["state"], sides.get("near"), filters)


def _count_dropped(t: pa.Table) -> pa.Table:
    """Rows per verdict in a batch ("" for kept): a handful of rows back to the driver."""
    d = pc.fill_null(t.column("dropped"), "")
    counts = pc.value_counts(d)
    return pa.table({"dropped": counts.field("values"), "rows": counts.field("counts").cast(pa.int64())})


def _kept_keys(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_null(t.column("dropped"))).select(KEYS.names)


def _filtered(run, model: str, filters: FiltersConfig, rows_in: int):
    """The VERDICT Dataset of the model's generations after every filter (materialized: a few
    dozen bytes a row, in the object store)."""
    from cousins.run.dataops import by_key, co_partition, materialize_counted, partitions_for
    from cousins.run.layout import read_rows

    layout = run.layout
    parts = partitions_for(rows_in, 20_000)
    light = ["prompt_id", "sample_index", "output_text", "finish_reason", "output_tokens", "error"]
    score = (filters.best_of_n or "").lstrip("-")
    if score in DERIVED:
        light.append("output_logprobs")
    elif score and score not in light:
        light.append(score)
    gens = read_rows(layout.generations(model), light)
    prompts = read_rows(layout.prompts, ["prompt_id", "messages", "reference", "choices"],
                        schema=schema.PROMPTS).map_batches(
        prompt_info, batch_format="pyarrow", num_cpus=0.1)
    gen_schema = pa.schema([f for f in schema.GENERATIONS if f.name in light])
    schemas = {"gen": gen_schema, "prompt": PROMPT_INFO}
    state = co_partition({"gen": gens, "prompt": prompts}, schemas, "prompt_id", parts).map_batches(
        _verdict_partition, fn_kwargs={"schemas": schemas, "filters": filters}, batch_size=None,
        batch_format="pyarrow")
    if filters.exact_dedup:
        state = by_key(state, "dedup_key", parts).map_batches(mark_exact, batch_size=None, batch_format="pyarrow")
    if filters.near_dedup or filters.best_of_n is not None:
        near = None
        if filters.near_dedup:
            with Bar("export verdicts", rows_in) as bar:
                state = materialize_counted(state, bar)  # read twice: for its bands and to mark them
            near = by_key(state.map_batches(band_rows, batch_format="pyarrow", num_cpus=0.1), "band",
                          parts).map_batches(band_duplicates, batch_size=None, batch_format="pyarrow")
        schemas = {"state": VERDICT, **({"near": KEYS} if near is not None else {})}
        state = co_partition({"state": state, "near": near}, schemas, "prompt_id", parts).map_batches(
            _near_and_best_partition, fn_kwargs={"schemas": schemas, "filters": filters}, batch_size=None,
            batch_format="pyarrow")
    with Bar("export filters", rows_in) as bar:
        return materialize_counted(state.select_columns(["prompt_id", "sample_index", "dropped"]), bar)


def export(cfg: ExportConfig) -> ExportResult:
    """Export a committed run's generations of one model as SFT (or KD) data on the connected Ray
    (a local one when none is: cfg.ray). ExportError on bad input, before any Ray work."""
    from cousins.run.runtime import init_ray

    if cfg.format not in ("parquet", "jsonl"):
        raise ExportError(f"format {cfg.format!r} must be parquet or jsonl")
    if cfg.rows_per_file < 1:
        raise ExportError(f"rows_per_file must be >= 1, got {cfg.rows_per_file}")
    if cfg.log.progress_s <= 0:
        raise ExportError(f"log.progress_s must be > 0, got {cfg.log.progress_s}")
    try:
        run = committed(resolve(cfg.storage.root, **cfg.storage.options), cfg.run_id)
    except NotCommitted as e:
        raise ExportError(str(e)) from None
    layout, manifest = run.layout, run.manifest
    models = {m["name"]: m for m in manifest["models"]}
    model = cfg.model or manifest["models"][0]["name"]
    if model not in models:
        raise ExportError(f"run {cfg.run_id!r} has no model {model!r}; models: {', '.join(models)}")
    if cfg.kd and not manifest["sampling"].get("logprobs"):
        raise ExportError(f"run {cfg.run_id!r} stored no top-k logprobs (sampling.logprobs=0): KD export needs them")
    problems = check_filters(cfg.filters, numeric_fields(schema.GENERATIONS))
    if problems:
        raise ExportError("invalid export filters:\n" + "\n".join(f"  - {p}" for p in problems))

    kind = "kd" if cfg.kd else "sft"
    out = resolve(cfg.out, **cfg.storage.options) if cfg.out else layout.run.join("distill", kind)
    setting = "out" if cfg.out else f"run {cfg.run_id!r}'s distill/{kind}"
    try:  # a new location, or a previous export of the project's (replaced whole at the end)
        check_ours(out, EXPORT, setting=setting)
    except NotOurs as e:
        raise ExportError(str(e)) from None
    rows_in = Run(layout, "committed").count(layout.generations(model))  # from the Parquet footers
    if rows_in == 0:
        raise ExportError(f"run {cfg.run_id!r} holds no generations of {model!r} (its corpus had no usable "
                          f"prompt): nothing to export, and nothing was written")

    init_ray(cfg.ray, cfg.log)
    state = _filtered(run, model, cfg.filters, rows_in)
    counts: dict = {}
    for r in state.map_batches(_count_dropped, batch_format="pyarrow", num_cpus=0.1).take_all():
        counts[r["dropped"] or None] = counts.get(r["dropped"] or None, 0) + r["rows"]
    kept = state.map_batches(_kept_keys, batch_format="pyarrow", num_cpus=0.1)
    kept_rows = counts.get(None, 0)
    with scratch(out) as aside:  # written aside, then swapped in: a failed export leaves the old one whole
        result = _write(cfg, run, model, kept, kept_rows, aside, kind=kind, out_url=out.url,
                        rows_in=rows_in, counts=counts)
        publish_dir(aside, out, EXPORT, setting=setting)
    return result


def _write(cfg: ExportConfig, run, model: str, kept, kept_rows: int, out: Location, *, kind: str, out_url: str,
           rows_in: int, counts: dict) -> ExportResult:
    """Write the kept rows, the `_SUCCESS` record and the dataset card into `out`."""
    from cousins.run.dataops import co_partition
    from cousins.run.layout import read_rows

    layout, manifest = run.layout, run.manifest
    columns = GEN_COLUMNS + (KD_COLUMNS if cfg.kd else [])
    schemas = {"gen": pa.schema([f for f in schema.GENERATIONS if f.name in columns]),
               "prompt": pa.schema([f for f in schema.PROMPTS if f.name in ("prompt_id", "messages", "reference")]),
               "keep": KEYS}
    sides = {"gen": read_rows(layout.generations(model), columns),
             "prompt": read_rows(layout.prompts, ["prompt_id", "messages", "reference"]), "keep": kept}
    # as few partitions (files) as the rows need: a small export stays one file
    parts = max(1, -(-kept_rows // min(cfg.rows_per_file, ROWS_PER_PARTITION[kind])))
    writes = co_partition(sides, schemas, "prompt_id", parts).map_batches(
        _write_partition, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"schemas": schemas, "out": out, "kd": cfg.kd, "teacher": model, "fmt": cfg.format,
                   "rows_per_file": cfg.rows_per_file})
    written = []
    with Bar("export write", kept_rows) as bar:
        for f in writes.iter_rows():
            written.append(f)
            bar.add(f["rows"], tokens=f["tokens"])
    files = [{k: f[k] for k in ("name", "rows", "bytes")} for f in sorted(written, key=lambda f: f["first"])]
    tokens = sum(f["tokens"] for f in written)
    if not files:  # every row filtered out: one empty file, so readers find the schema
        name = f"part-00000.{cfg.format}"
        data = _encode((KD if cfg.kd else SFT).empty_table(), cfg.format)
        out.join(name).write_bytes_atomic(data)
        files = [{"name": name, "rows": 0, "bytes": len(data)}]
    rows_out = sum(f["rows"] for f in files)
    size = sum(f["bytes"] for f in files)
    topk = manifest["sampling"].get("logprobs") if cfg.kd else None
    result = ExportResult(out_url=out_url, files=files, rows_in=rows_in, rows_out=rows_out,
                          filters=reports(counts, rows_in, cfg.filters), output_tokens=tokens,
                          bytes_per_output_token=size / tokens if tokens else None, topk=topk)
    mark_done(out, encode(ExportDone(rows=rows_out, files=[ExportFile(**f) for f in files])))
    out.join("README.md").write_text_atomic(dataset_card(cfg, manifest, model, result))
    return result


def _encode(t: pa.Table, fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in t.to_pylist()).encode()
    return parquet_bytes(t)

