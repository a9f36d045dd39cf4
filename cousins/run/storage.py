"""Where runs live: one place that turns a URL into a filesystem, atomic small writes, Parquet parts and stage markers.

`file://` (or a plain path) is the default; any fsspec protocol works (`s3://` through s3fs).
A run directory is invisible to readers until `manifest.json` exists with status "committed";
each stage's directory gets a `_SUCCESS` marker after its files are written. Where a run's stages
are, and reading them, belong to cousins/run/layout.py.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.fs as pafs

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it, resolved once from a URL."""

    fs: fsspec.AbstractFileSystem
    path: str  # no protocol; absolute for local files

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    @property
    def url(self) -> str:
        proto = _protocols(self.fs)[0]
        return self.path if proto == "file" else f"{proto}://{self.path}"

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, *parts))

    def arrow_fs(self) -> pafs.FileSystem:
        """The same filesystem for pyarrow and Ray Data writers/readers."""
        if self.is_local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def exists(self) -> bool:
        self.fs.invalidate_cache(self.path)  # object-store listings are cached; other processes write
        return self.fs.exists(self.path)

    def read_text(self) -> str:
        with self.fs.open(self.path, "rb") as f:
            return f.read().decode("utf-8")

    def write_bytes_atomic(self, data: bytes) -> None:
        """Write a file so that readers see the old content or the new, never half of it.

        Local files go through a temporary in a `_tmp/` beside them (readers skip names starting
        with '_') and a rename; object stores publish an object only when its upload completes,
        so a plain put is already atomic there.
        """
        if self.is_local:
            tmp_dir = posixpath.join(posixpath.dirname(self.path), "_tmp")
            os.makedirs(tmp_dir, exist_ok=True)
            tmp = posixpath.join(tmp_dir, f"{posixpath.basename(self.path)}.{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        else:
            self.fs.pipe_file(self.path, data)

    def write_text_atomic(self, text: str) -> None:
        self.write_bytes_atomic(text.encode("utf-8"))

    def write_json_atomic(self, obj: Any) -> None:
        self.write_text_atomic(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


# Object stores fail fast and boundedly when unreachable: a run that cannot write stops with an
# error in about a minute instead of retrying for many. The user's storage.options win.
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2, "mode": "standard"}},
}


def _with_defaults(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    if protocol not in ("s3", "s3a"):
        return options
    merged = {**S3_DEFAULTS, **options}
    merged["config_kwargs"] = {**S3_DEFAULTS["config_kwargs"], **options.get("config_kwargs", {})}
    return merged


def resolve(url: str, **storage_options: Any) -> Location:
    """Resolve a URL or plain path into a Location; plain and file:// paths become absolute.

    Credentials come from the environment (AWS_ACCESS_KEY_ID, …; AWS_ENDPOINT_URL for an
    S3-compatible server) or from storage options; never from a file the run writes."""
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    protocol = url.split("://", 1)[0]
    fs, path = fsspec.core.url_to_fs(url, **_with_defaults(protocol, storage_options))
    loc = Location(fs, path)
    if loc.is_local:
        loc = Location(fs, os.path.abspath(path))
    return loc


def list_files(loc: Location, extensions: tuple[str, ...]) -> list[str]:
    """The files a corpus location names: itself, a directory's files, or a glob's matches.

    Hidden files and files starting with '_' (markers) are skipped in directories. Sorted, so
    the order (and so every source_row) is stable.
    """
    return sorted(file_infos(loc, extensions))


def file_infos(loc: Location, extensions: tuple[str, ...]) -> dict[str, dict]:
    """`list_files`'s files with their listing details (size, mtime or ETag), from one listing:
    no request per file on an object store."""
    fs, path = loc.fs, loc.path
    if any(ch in path for ch in "*?["):
        return dict(fs.glob(path, detail=True))
    if fs.isdir(path):
        return {p: info for p, info in fs.find(path, detail=True).items()
                if not posixpath.basename(p).startswith((".", "_"))
                and (not extensions or p.lower().endswith(extensions))}
    if fs.exists(path):
        return {path: fs.info(path)}
    return {}


def _leaves(schema) -> list[tuple[str, object]]:
    """(Parquet leaf path, Arrow type) of every column, nested lists and structs walked
    ("topk_logprobs.list.element.list.element")."""
    import pyarrow as pa

    def walk(path: str, t) -> list:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return walk(f"{path}.list.element", t.value_type)
        if pa.types.is_struct(t):
            return [p for f in t for p in walk(f"{path}.{f.name}", f.type)]
        return [(path, t)]

    return [p for f in schema for p in walk(f.name, f.type)]


def parquet_bytes(table) -> bytes:
    """A table as one zstd Parquet file. Floating-point columns (logprobs above all: top-k of them
    per token are most of a KD run's bytes) are written BYTE_STREAM_SPLIT without a dictionary:
    log-probabilities barely repeat, so a dictionary only adds indices, while splitting each
    float's bytes into streams lets zstd find the shared sign and exponent bytes. Lossless (pyarrow
    and DuckDB read it back, checked in the tests and the benchmark); a third smaller on top-20
    generation rows. Other columns keep Parquet's dictionary encoding."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    leaves = _leaves(table.schema)
    floats = [p for p, t in leaves if pa.types.is_floating(t)]
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_byte_stream_split=floats or False,
                   use_dictionary=[p for p, _ in leaves if p not in floats])
    return buf.getvalue()


def write_parquet_atomic(table, loc: Location) -> None:
    """One Parquet file (`parquet_bytes`), published whole or not at all."""
    loc.write_bytes_atomic(parquet_bytes(table))


def mark_done(stage_dir: Location, info: dict | None = None) -> None:
    """Publish a stage: its `_SUCCESS` marker, holding what the stage wants to remember (JSON)."""
    stage_dir.join(SUCCESS).write_json_atomic(info or {})


def is_done(stage_dir: Location) -> bool:
    return stage_dir.join(SUCCESS).exists()


def done_info(stage_dir: Location) -> dict:
    text = stage_dir.join(SUCCESS).read_text()
    return json.loads(text) if text.strip() else {}
