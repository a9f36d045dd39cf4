"""A run's layout, and the one way every module reads a stage.

    {root}/runs/{run_id}/
        config.yaml  manifest.json  summary.json  report.html  (audits: audit.json)
        prompts/  errors/                       the run's prompts and the corpus's error rows
        generations/model=NAME/                 each model's generations (the noise floor too)
        scores/model=NAME/  kld/model=NAME/     each model's teacher-forced scores, exact KLD
        drift/cousin=NAME/                      each cousin's drift rows

A stage directory holds Parquet part files, each published whole, and a `_SUCCESS` marker
(cousins/run/storage.py). Nothing else spells these paths: modules ask `RunLayout` for a stage and
read it here, as a Ray Dataset (`read_rows`: part files read with pyarrow in light tasks), as one
table (`read_table`: for what the driver may hold, keys and counts or a small run), as its row
count from the Parquet footers (`count_rows`), or as its published files (`part_files`);
`RunLayout.parts_by_name` lists which models' stages of a kind are present, with their files.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow as pa

from cousins.run.storage import MANIFEST, Location

# The kinds of stage and how each names its models' directories.
PROMPTS, ERRORS = "prompts", "errors"
GENERATIONS, SCORES, KLD, DRIFT = "generations", "scores", "kld", "drift"
PARTITION = {GENERATIONS: "model", SCORES: "model", KLD: "model", DRIFT: "cousin"}
RUNS = "runs"


def runs_dir(root: Location) -> Location:
    """Where every run under a storage root lives: {root}/runs/."""
    return root.join(RUNS)


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run: {root}/runs/{run_id}/…"""

    root: Location
    run_id: str

    @property
    def run(self) -> Location:
        return runs_dir(self.root).join(self.run_id)

    @property
    def prompts(self) -> Location:
        return self.run.join(PROMPTS)

    @property
    def errors(self) -> Location:
        return self.run.join(ERRORS)

    def stage(self, kind: str, name: str) -> Location:
        """The stage of one model (or cousin) of a kind: {run}/{kind}/{model|cousin}={name}."""
        return self.run.join(kind, f"{PARTITION[kind]}={name}")

    def generations(self, model: str) -> Location:
        return self.stage(GENERATIONS, model)

    def scores(self, model: str) -> Location:
        return self.stage(SCORES, model)

    def kld(self, model: str) -> Location:
        return self.stage(KLD, model)

    def drift(self, cousin: str) -> Location:
        return self.stage(DRIFT, cousin)

    def kind_dir(self, kind: str) -> Location:
        """The directory of every stage of a kind ({run}/drift/ for the diff's writers)."""
        return self.run.join(kind)

    def parts_by_name(self, kind: str) -> dict[str, list[str]]:
        """Each model's (or cousin's) published part files of a kind, from ONE recursive listing of
        {run}/{kind}/ (one LIST on an object store, not one per model), by `part_files`' rule: Parquet
        files directly in `{model|cousin}=NAME/` whose names do not start with '_' or '.'. A
        directory of a name the project would never write (cousins.contract.names) is skipped."""
        from cousins.contract.names import is_name

        top = self.kind_dir(kind)
        top.fs.invalidate_cache(top.path)
        try:
            found = top.fs.find(top.path)
        except FileNotFoundError:
            return {}
        prefix, key = top.path.rstrip("/") + "/", f"{PARTITION[kind]}="
        out: dict[str, list[str]] = {}
        for path in found:
            parts = path[len(prefix):].split("/") if path.startswith(prefix) else []
            if len(parts) != 2 or not parts[0].startswith(key):
                continue
            name, file = parts[0][len(key):], parts[1]
            if is_name(name):
                listed = out.setdefault(name, [])
                if is_part(file):
                    listed.append(path)
        return {n: sorted(f) for n, f in sorted(out.items())}

    def stage_key(self, kind: str, name: str | None = None) -> str:
        """A stage as the manifest names it: `prompts`, `scores/model=NAME`, `drift/cousin=NAME`."""
        return kind if name is None else f"{kind}/{PARTITION[kind]}={name}"

    @property
    def summary(self) -> Location:
        return self.run.join("summary.json")

    @property
    def report(self) -> Location:
        return self.run.join("report.html")

    @property
    def audit(self) -> Location:
        return self.run.join("audit.json")

    @property
    def config(self) -> Location:
        return self.run.join("config.yaml")

    @property
    def manifest(self) -> Location:
        return self.run.join(MANIFEST)


def is_part(name: str) -> bool:
    """A published part file's name: temporaries and markers (names starting with '_' or '.') are
    never data, so files of a crashed attempt that were not published are never read."""
    return name.endswith(".parquet") and not name.startswith(("_", "."))


def partition_name(path: str) -> str:
    """The model (or cousin) a part file belongs to, from its directory:
    .../generations/model=NAME/part-….parquet -> NAME ("" for prompts/ and errors/)."""
    parent = path.rstrip("/").rsplit("/", 2)[-2]
    key, sep, name = parent.partition("=")
    return name if sep and key in PARTITION.values() else ""


def part_path(stage: Location, key: str) -> Location:
    """Where a stage's part of rows whose keys hash to `key` goes (cousins.run.ledger.batch_key):
    a retried batch rewrites the same name."""
    return stage.join(f"part-{key}.parquet")


def part_files(stage_dir: Location) -> list[str]:
    """The Parquet files of a stage directory: temporaries and markers (names starting with '_' or
    '.') are never data, so files of a crashed attempt that were not published are never read."""
    if not stage_dir.exists():
        return []
    stage_dir.fs.invalidate_cache(stage_dir.path)  # parts are written by other processes
    return sorted(p for p in stage_dir.fs.ls(stage_dir.path, detail=False) if is_part(posixpath.basename(p)))


def read_table(stage: Location, columns: list[str] | None = None) -> pa.Table:
    """A stage's published parts as one table (no rows, the asked columns, when it has none).
    For what the driver may hold: keys and counts, or a small run; rows at scale go through `read_rows`."""
    import pyarrow.dataset as pads

    found = part_files(stage)
    if not found:
        return pa.table({c: pa.array([], pa.null()) for c in columns or []})
    return pads.dataset(found, filesystem=stage.arrow_fs(), format="parquet").to_table(columns=columns)


FOOTER_READERS = 8  # threads reading a stage's Parquet footers (object storage answers each in tens of ms)


def count_rows(stage: Location, where=None) -> int:
    """Rows in a stage's published parts (from the Parquet footers; with `where`, a pyarrow
    expression, the rows that match it, streamed through the columns it names). The footers are
    read one file at a time by a few threads: a pyarrow dataset's scan of them kept tens of MiB in
    the driver's allocator per stage of a large run."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    from concurrent.futures import ThreadPoolExecutor

    found = part_files(stage)
    if not found:
        return 0
    fs = stage.arrow_fs()
    if where is not None:
        return pads.dataset(found, filesystem=fs, format="parquet").count_rows(filter=where)
    with ThreadPoolExecutor(min(FOOTER_READERS, len(found))) as pool:
        return sum(pool.map(lambda f: pq.read_metadata(f, filesystem=fs).num_rows, found))


READ_BATCH_ROWS = 65_536  # rows a batch of a driver-side scan (read_batches)


def read_batches(stage: Location, columns: list[str]):
    """A stage's published parts streamed into the driver as record batches of `columns`, one file
    and one row group at a time, for a scan that may stop early (it never holds the stage)."""
    import pyarrow.parquet as pq

    fs = stage.arrow_fs()
    for path in part_files(stage):
        with fs.open_input_file(path) as f:
            part = pq.ParquetFile(f)
            has = set(part.schema_arrow.names)  # a column a part lacks (written before it existed) reads as nulls
            for b in part.iter_batches(batch_size=READ_BATCH_ROWS, columns=[c for c in columns if c in has]):
                yield pa.RecordBatch.from_arrays([b.column(c) if c in has else pa.nulls(b.num_rows) for c in columns],
                                                 names=list(columns))


def read_rows(stages: Location | list[Location], columns: list[str] | None = None, *, schema: pa.Schema | None = None,
         tag=None, tag_kwargs: dict | None = None):
    """One or several stages' part files as one Ray Dataset (None when they hold none). With
    `schema`, columns a part lacks (written before they existed) read as nulls; `tag(table, path,
    **tag_kwargs)` may mark each file's rows (e.g. with `partition_name(path)`)."""
    stages = [stages] if isinstance(stages, Location) else stages
    found = [f for stage in stages for f in part_files(stage)]
    if not found:
        return None
    return _read_files(found, stages[0].arrow_fs(), columns, tag=tag, tag_kwargs=tag_kwargs, schema=schema)


FILES_PER_TASK = 64


def _read_batch(batch: pa.Table, *, filesystem, columns: list[str] | None, tag=None, tag_kwargs=None,
                schema: pa.Schema | None = None) -> pa.Table:
    """The part files named in a batch of paths, read with pyarrow (one fragment each, so `tag`
    can mark each file's rows, e.g. with the model its directory names)."""
    import pyarrow.dataset as pads

    paths = batch.column("path").to_pylist()
    tables = []
    for frag in pads.dataset(paths, filesystem=filesystem, format="parquet", schema=schema).get_fragments():
        t = frag.to_table(columns=columns)
        tables.append(tag(t, frag.path, **(tag_kwargs or {})) if tag else t)
    return pa.concat_tables(tables)


def _read_files(files: list[str], filesystem, columns: list[str] | None = None, *, tag=None, tag_kwargs=None,
               schema: pa.Schema | None = None):
    """Part files as a Dataset, read by tasks of up to FILES_PER_TASK files each with pyarrow (a
    few tasks per CPU at least). Ray Data's own Parquet read pays tens of milliseconds and some
    driver memory per file: at thousands of part files that was most of the diff's time."""
    import ray
    import ray.data

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = min(len(files), max(4 * cpus, -(-len(files) // FILES_PER_TASK)))
    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=blocks).map_batches(
        _read_batch, batch_size=None, batch_format="pyarrow", num_cpus=0.1,
        fn_kwargs={"filesystem": filesystem, "columns": columns, "tag": tag, "tag_kwargs": tag_kwargs,
                   "schema": schema})
