"""A run's life, owned here: open it (new, resume, or refuse), read and publish its stages, verify
and finish each stage, commit it; and the one way every reader finds a committed run.

A run lives under {root}/runs/{run_id}/ and is built so that it survives being killed:

- `config.yaml` is written first. A rerun with the same run id and the same config resumes; one
  with a different config is refused, naming the keys that differ (`RESUMABLE_KEYS` may change
  between attempts, e.g. to resume on a bigger cluster).
- A stage writes part files, each published whole (a temporary renamed into place, or one object
  PUT) and named by the hash of the row keys it holds, so a retried batch rewrites the same file.
  A stage is finished by its `_SUCCESS` marker (a record of `cousins.contract.records`) once its rows are
  verified: exactly the expected count, no duplicate (prompt_id, sample_index).
- `manifest.json` (records.Manifest) is written last. A run is committed when its manifest says
  so; readers (`committed`) see committed runs only.
"""

from __future__ import annotations

import enum
import hashlib
import json
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import numpy as np
import pyarrow as pa
import yaml

from cousins.contract import schema
from cousins.contract.codec import decode, encode
from cousins.contract.records import Manifest, ModelEntry
from cousins.contract.summary import Summary
from cousins.run import removal
from cousins.run.layout import RunLayout, count_rows, part_path, read_batches, read_table
from cousins.run.removal import remove_tree
from cousins.run.storage import SUCCESS, Location, done_info, is_done, mark_done, resolve, write_parquet_atomic

# Keys that may differ between attempts of one run: where and how wide it runs, not what it computes.
RESUMABLE_KEYS = ("ray.", "engine.num_actors", "engine.cpus_per_actor", "engine.start_timeout_s", "storage.options",
                  "run.run_id", "log.",
                  "drift.recompute", "cost.")
# The columns a stage's verification reads back: keys, and what a stage's counts are made of.
STAT_COLUMNS = ["prompt_id", "sample_index", "prompt_tokens", "output_tokens", "engine_time_s",
                "finish_reason", "error"]

R = TypeVar("R")


class RunState(str, enum.Enum):
    """Where an opened run stands: NEW (config.yaml written now), RESUME (an earlier attempt's
    stages are kept or finished), COMMITTED (already: readers see it)."""

    NEW = "new"
    RESUME = "resume"
    COMMITTED = "committed"


class RunConflict(ValueError):
    """The run id exists with another config."""


class StageIncomplete(RuntimeError):
    """A stage's rows are not exactly what it should hold; a rerun with the same run id finishes it."""


class NotCommitted(LookupError):
    """No committed run at that id; the message says what is there instead."""


# --- config identity -------------------------------------------------------------------------------

def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_diff(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ, except those an attempt may change (RESUMABLE_KEYS)."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [k for k in keys if not k.startswith(RESUMABLE_KEYS)]


def config_hash(config: dict) -> str:
    """The identity of what a (redacted) config computes: placement keys left out."""
    flat = {k: v for k, v in _flatten(config).items() if not k.startswith(RESUMABLE_KEYS)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def new_run_id(config: dict) -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{config_hash(config)}"


# --- stage markers ------------------------------------------------------------------------------

def read_marker(stage: Location, cls: type[R]) -> R:
    """A stage's `_SUCCESS` marker as its record."""
    return decode(cls, done_info(stage), f"{stage.url}/{SUCCESS}")


# --- the write side --------------------------------------------------------------------------------

def publish_part(batch: pa.Table, *, out: Location) -> pa.Table:
    """Publish one part file, named by its rows' keys: a retried batch rewrites the same name.
    (A Ray Data `map_batches` function: returns the part's rows and output tokens.)"""
    from cousins.run.ledger import batch_key

    write_parquet_atomic(batch, part_path(out, batch_key(batch)))
    tokens = batch.column("output_tokens").to_pylist() if "output_tokens" in batch.column_names else []
    return pa.table({"rows": [batch.num_rows], "output_tokens": [sum(t or 0 for t in tokens)]})


class _RunDir:
    """What the write and the read side share: a run directory (`layout`) and reading its stages."""

    layout: RunLayout

    @property
    def run_id(self) -> str:
        return self.layout.run_id

    @property
    def url(self) -> str:
        return self.layout.run.url

    def read(self, stage: Location, columns: list[str] | None = None) -> pa.Table:
        """A stage as one table (cousins.run.layout.read_table: for what the driver may hold)."""
        return read_table(stage, columns)


@dataclass(frozen=True)
class Run(_RunDir):
    """An open run, in its `state`."""

    layout: RunLayout
    state: RunState

    def done(self, stage: Location) -> bool:
        return is_done(stage)

    def marker(self, stage: Location, cls: type[R]) -> R:
        return read_marker(stage, cls)

    def keys(self, stage: Location) -> "KeySet":
        """The (prompt_id, sample_index) keys a stage's published parts already hold, as their
        hashes (read a batch at a time: 16 bytes a row, whatever the stage's size)."""
        parts = [_hashes(b) for b in read_batches(stage, list(KEY_COLUMNS))]
        return KeySet.of(np.concatenate(parts) if parts else np.empty(0, schema.KEY_HASH))

    def count(self, stage: Location) -> int:
        """Rows in a stage's published parts (from the Parquet footers)."""
        return count_rows(stage)

    def restart(self, stage: Location) -> None:
        """Drop an unfinished stage's files: what an earlier attempt left is redone, never kept.
        Only inside this run's own directory (its config.yaml; cousins/run/removal.py)."""
        remove_tree(stage, removal.RUN, owner=self.layout.run, setting="run.run_id",
                    remedy="Start a new run (another run.run_id)")

    def verify(self, stage: Location, expected: int, what: str, columns: list[str] = STAT_COLUMNS,
               fold: Callable[[Any, pa.Table], Any] | None = None) -> Any:
        """Check that a stage holds exactly `expected` rows with distinct keys (StageIncomplete,
        naming `what`, otherwise), reading its `columns` a batch at a time: the driver keeps the
        keys' hashes (8 bytes a row), never the rows. Returns `fold(acc, batch)` folded over the
        batches from `fold(None, None)` (a stage's counts), or None without `fold`."""
        first, acc = [], fold(None, None) if fold is not None else None  # first: each row's first hash
        for batch in read_batches(stage, list(dict.fromkeys([*KEY_COLUMNS, *columns]))):
            first.append(_hashes(batch, ("a",))["a"].copy())
            if fold is not None:
                acc = fold(acc, pa.Table.from_batches([batch]))
        rows = sum(map(len, first))
        unique = _distinct(stage, first) if first else 0
        if unique != rows or rows != expected:
            raise StageIncomplete(f"{what}: {rows} rows, {unique} distinct keys, expected {expected}; "
                                  f"rerun with the same run.run_id={self.run_id} to finish it")
        return acc

    def finish(self, stage: Location, record: Any) -> None:
        """Publish a stage: its `_SUCCESS` marker, holding the stage's record."""
        mark_done(stage, encode(record))

    def write_summary(self, summary: Summary, report_html: str) -> dict:
        """summary.json and report.html of a drift run; returns the summary as written."""
        data = encode(summary)
        self.layout.summary.write_text_atomic(json.dumps(data, indent=1, allow_nan=False))
        self.layout.report.write_text_atomic(report_html)
        return data

    def commit(self, manifest: Manifest) -> None:
        """Write manifest.json, last: from now on readers see the run."""
        decode(Manifest, encode(manifest))  # what is written must read back as its declaration
        self.layout.manifest.write_json_atomic(encode(manifest))


KEY_COLUMNS = ("prompt_id", "sample_index")


def _hashes(batch: pa.RecordBatch, fields: tuple[str, ...] = schema.KEY_HASH.names) -> np.ndarray:
    return schema.key_hashes(pa.Table.from_batches([batch]), fields)


def _distinct(stage: Location, first: list[np.ndarray]) -> int:
    """How many distinct keys a stage holds, from each row's first hash; rows that share one (a
    key twice, or two keys of one first hash: about one pair in 1e19) are read again for both."""
    a = np.sort(np.concatenate(first))
    same = a[1:] == a[:-1]
    if not same.any():
        return len(a)
    shared = np.unique(a[1:][same])
    full = np.concatenate([h[np.isin(h["a"], shared)] for h in map(_hashes, read_batches(stage, list(KEY_COLUMNS)))])
    return len(a) - int(same.sum()) - len(shared) + len(np.unique(full))


@dataclass(frozen=True)
class KeySet:
    """A stage's row keys as their hashes (schema.key_hashes): `a` sorted, and `b` beside it (the
    keys in (a, b) order, each once), 16 bytes a key."""

    a: np.ndarray
    b: np.ndarray

    @classmethod
    def of(cls, hashes: np.ndarray) -> "KeySet":
        h = np.unique(hashes)  # sorted by (a, b)
        return cls(np.ascontiguousarray(h["a"]), np.ascontiguousarray(h["b"]))

    def __len__(self) -> int:
        return len(self.a)

    def holds(self, table: pa.Table) -> np.ndarray:
        """Which of `table`'s rows (by their keys) the set holds: a binary search per row."""
        q = schema.key_hashes(table)
        if not len(self):
            return np.zeros(len(q), bool)
        lo, hi = np.searchsorted(self.a, q["a"], "left"), np.searchsorted(self.a, q["a"], "right")
        found = hi > lo
        held = found & (self.b[np.minimum(lo, len(self.b) - 1)] == q["b"])
        for i in np.flatnonzero(found & ~held & (hi - lo > 1)):  # keys sharing a first hash: their second decides
            held[i] = bool((self.b[lo[i]:hi[i]] == q["b"][i]).any())
        return held


def open_run(root: Location, run_id: str | None, config: dict) -> Run:
    """Create the run (config.yaml first), or find it for a resume; RunConflict if it exists with
    another config. `config` is the redacted config. Needs storage only, no Ray: a conflicting
    rerun is refused before any cluster work."""
    layout = RunLayout(root, run_id or new_run_id(config))
    if layout.config.exists():
        if not removal.is_ours(layout.run, removal.RUN):
            raise RunConflict(f"run.run_id: {layout.config.url!r} is not a run's config.yaml written by the "
                              f"project; choose another run.run_id or storage.root")
        stored = yaml.safe_load(layout.config.read_text()) or {}
        diff = config_diff(stored, config)
        if diff:
            raise RunConflict(
                f"run {layout.run_id!r} at {layout.run.url} was started with a different config; "
                f"differing keys: {', '.join(diff)}. Rerun with the same config to resume it, "
                f"or choose another run.run_id.")
        return Run(layout, RunState.COMMITTED if layout.manifest.exists() else RunState.RESUME)
    if layout.manifest.exists():
        raise RunConflict(f"run {layout.run_id!r} at {layout.run.url} has a manifest but no config.yaml; "
                          f"choose another run.run_id")
    if not removal.is_ours(layout.run, removal.RUN):  # something else is there: never written into
        raise RunConflict(f"run.run_id: {layout.run.url!r} already holds files the project did not write (no "
                          f"config.yaml there); choose another run.run_id or storage.root")
    layout.config.write_text_atomic(yaml.safe_dump(config, sort_keys=False))
    return Run(layout, RunState.NEW)


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


# --- the read side: committed runs ----------------------------------------------------------------

def manifest_of(layout: RunLayout) -> dict | None:
    """The run's manifest if it says committed; None for a missing, unreadable or uncommitted one.
    The one test of "is this run committed?" for every reader."""
    loc = layout.manifest
    try:
        loc.fs.invalidate_cache(loc.path)
        manifest = json.loads(loc.fs.cat_file(loc.path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("status") == "committed" else None


@dataclass(frozen=True)
class CommittedRun(_RunDir):
    """A committed run, read-only: its layout, its manifest (as written) and its stages."""

    layout: RunLayout
    manifest: dict

    def typed(self) -> Manifest:
        """The manifest as its record (RecordError naming the first key that does not fit)."""
        return decode(Manifest, self.manifest, f"{self.url}/manifest.json")

    def model_names(self) -> list[str]:
        return [m["name"] for m in self.manifest.get("models", [])]

    def entries(self) -> list[ModelEntry]:
        """The models that ran, as the manifest records them: the original first."""
        return [ModelEntry(name=m.name, path=m.path, dtype=m.dtype, quantization=m.quantization, kind=m.kind,
                           text_only=m.text_only, reorder=m.reordered, revision=m.revision, lora=m.lora,
                           endpoint=m.endpoint)
                for m in self.typed().models]

    def config(self) -> dict:
        """config.yaml as written when the run started (secrets masked)."""
        return yaml.safe_load(self.layout.config.read_text()) or {}


def committed(root: Location, run_id: str) -> CommittedRun:
    """The committed run `run_id` under `root`; NotCommitted, saying what is there, otherwise."""
    layout = RunLayout(root, run_id)
    manifest = manifest_of(layout)
    if manifest is not None:
        return CommittedRun(layout, manifest)
    if layout.manifest.exists():
        raise NotCommitted(f"run {run_id!r} at {layout.run.url} is not committed (its {layout.manifest.path} "
                           f"does not say status 'committed')")
    if layout.config.exists():
        raise NotCommitted(f"run {run_id!r} at {layout.run.url} is not committed (no manifest.json): "
                           f"rerun it with the same run.run_id to finish it")
    raise NotCommitted(f"unknown run {run_id!r}: nothing at {layout.run.url}")


def committed_at(run_url: str, **storage_options: Any) -> CommittedRun:
    """The committed run at a run URL ({root}/runs/{run_id}, any fsspec URL or path)."""
    loc = resolve(run_url, **storage_options)
    path = loc.path.rstrip("/")
    root = type(loc)(loc.fs, posixpath.dirname(posixpath.dirname(path)))
    return committed(root, posixpath.basename(path))
