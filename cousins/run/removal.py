"""The one rule for removing and replacing directories: the project deletes only what it wrote.

Every recursive removal in the package goes through `remove_tree`, and every replacement of a
directory through `publish_dir`. A location may be removed or replaced only when it is

- absent, or an empty directory (nothing is lost);
- a temporary this process made with `scratch` (its name is random and remembered here);
- or the project's own: it holds the `Marker` the caller names (a build's record, an export's
  `_SUCCESS`, a run's `config.yaml`, a fetched copy's record, a synthetic run's marker), and the
  marker's content is what the project writes there.

Anything else is refused with `NotOurs`: one line naming the location, what was missing, and the
setting to change. Users name locations (`storage.root`, an export's `out`, `model.path`, a
cousin's `path`, `COUSINS_MODEL_CACHE`, a run id); none of them is ever emptied on a guess.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

from cousins.run.storage import Location, resolve

_SCRATCH: set[str] = set()  # urls of the temporaries this process made (scratch)


class NotOurs(RuntimeError):
    """A removal or a replacement would touch files the project did not write."""


def _json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except ValueError:
        return False


@dataclass(frozen=True)
class Marker:
    """What the project writes into a location it owns: a file `name` (relative to the location)
    whose content `accepts` (any content when None)."""

    name: str
    what: str  # for messages: "build record (cousins_recipe.json)"
    accepts: Callable[[bytes], bool] | None = _json_object


def _keys(*keys: str) -> Callable[[bytes], bool]:
    def accepts(data: bytes) -> bool:
        try:
            obj = json.loads(data)
        except ValueError:
            return False
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return accepts


def _run_config(data: bytes) -> bool:
    import yaml

    try:
        obj = yaml.safe_load(data)
    except yaml.YAMLError:
        return False
    return isinstance(obj, dict) and {"run", "model", "storage", "corpus"} <= set(obj)


# The project's markers, one per kind of location it owns.
BUILD = Marker("cousins_recipe.json", "build record (cousins_recipe.json)")
FETCHED = Marker(".cousins-fetched.json", "fetched-copy record (.cousins-fetched.json)", _keys("source", "files"))
MERGED = Marker(".cousins-merged.json", "merged-adapter record (.cousins-merged.json)", _keys("base", "adapter"))
EXPORT = Marker("_SUCCESS", "export record (_SUCCESS with rows and files)", _keys("rows", "files"))
RUN = Marker("config.yaml", "run config (config.yaml written by a run)", _run_config)
SYNTHETIC = Marker("_SYNTHETIC.json", "synthetic-copy marker (_SYNTHETIC.json)", _keys("source_run", "factor"))


def _location(where: Location | str | os.PathLike) -> Location:
    return where if isinstance(where, Location) else resolve(os.fspath(where))


def _listing(loc: Location) -> list[str] | None:
    """What is directly in `loc`: None when nothing is there, [] for an empty directory; a file
    is listed as itself."""
    fs = loc.fs
    fs.invalidate_cache(loc.path)
    if loc.is_local:
        if not os.path.lexists(loc.path):
            return None
        if os.path.islink(loc.path) or not os.path.isdir(loc.path):
            return [loc.path]
        return os.listdir(loc.path)
    try:
        if fs.isfile(loc.path):
            return [loc.path]
        return [p for p in fs.ls(loc.path, detail=False) if p.rstrip("/") != loc.path.rstrip("/")]
    except FileNotFoundError:
        return None


def is_ours(where: Location | str | os.PathLike, marker: Marker, *, owner: Location | None = None) -> bool:
    """Whether `where` may be removed: absent, empty, this process's scratch, or marked by `marker`
    (at `owner`, a directory holding `where`, when given: a run's stage is owned by its run)."""
    loc = _location(where)
    home = owner or loc
    if home.path.rstrip("/") != loc.path.rstrip("/") and not loc.path.startswith(home.path.rstrip("/") + "/"):
        raise ValueError(f"{home.url} does not hold {loc.url}")
    if loc.url in _SCRATCH:
        return True
    listing = _listing(loc)
    if not listing:
        return True
    if loc.is_local and (os.path.islink(loc.path) or not os.path.isdir(loc.path)):
        return False  # a file or a link where a directory goes: never ours to replace
    mark = home.join(marker.name)
    try:
        with mark.fs.open(mark.path, "rb") as f:
            data = f.read(1 << 20)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return False
    return marker.accepts is None or marker.accepts(data)


def refusal(where: Location | str | os.PathLike, marker: Marker, setting: str, *, remedy: str | None = None) -> str:
    """The one line a refusal says."""
    loc = _location(where)
    return (f"{setting}: {loc.url!r} holds files the project did not write (no {marker.what} there), and this "
            f"would delete or overwrite them: the project never deletes or overwrites such files. "
            f"{remedy or f'Point {setting} at a new or empty location'}")


def check_ours(where: Location | str | os.PathLike, marker: Marker, *, setting: str,
               owner: Location | None = None, remedy: str | None = None) -> None:
    """NotOurs (one line: the location, the marker it lacks, the setting to change) unless
    `is_ours`."""
    if not is_ours(where, marker, owner=owner):
        raise NotOurs(refusal(where, marker, setting, remedy=remedy))


def remove_tree(where: Location | str | os.PathLike, marker: Marker, *, setting: str,
                owner: Location | None = None, remedy: str | None = None) -> None:
    """Remove `where` and everything under it, if it is the project's (`check_ours`); NotOurs,
    removing nothing, otherwise. Nothing there is not an error."""
    loc = _location(where)
    check_ours(loc, marker, setting=setting, owner=owner, remedy=remedy)
    _remove(loc)


def _remove(loc: Location) -> None:
    if loc.is_local:
        if os.path.islink(loc.path) or os.path.isfile(loc.path):
            os.unlink(loc.path)
        elif os.path.isdir(loc.path):
            shutil.rmtree(loc.path)
    else:
        loc.fs.invalidate_cache(loc.path)
        if loc.fs.exists(loc.path):
            loc.fs.rm(loc.path, recursive=True)
    _SCRATCH.discard(loc.url)


@contextlib.contextmanager
def scratch(beside: Location | str | os.PathLike) -> Iterator[Location]:
    """A new temporary location beside `beside` (a hidden sibling with a random name, created
    empty on local disks), removed on the way out unless it was published (`publish_dir`). Only
    this process may remove it; a killed process leaves it, under a name no user picks."""
    dest = _location(beside)
    parent, name = posixpath.split(dest.path.rstrip("/"))
    tmp = Location(dest.fs, posixpath.join(parent, f".{name}.cousins-tmp-{uuid.uuid4().hex[:12]}"))
    if tmp.is_local:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(tmp.path)  # fails if it exists: what it removes later is what it made
    _SCRATCH.add(tmp.url)
    try:
        yield tmp
    finally:
        if tmp.url in _SCRATCH:
            _remove(tmp)


def publish_dir(tmp: Location, dest: Location | str | os.PathLike, marker: Marker, *, setting: str,
                remedy: str | None = None) -> None:
    """Put the finished `tmp` (a `scratch`) at `dest`, replacing what is there only if it is the
    project's (`check_ours`, else NotOurs and `dest` untouched).

    Local disks: two renames (`dest` aside, `tmp` in), then the old copy is removed; a reader sees
    the old directory or the new one, never a mix. Object stores have no rename: the old objects
    are removed, the new ones copied in with the marker last (a reader that waits for the marker
    never reads half), then the temporary is removed."""
    dest = _location(dest)
    if tmp.url not in _SCRATCH:
        raise ValueError(f"{tmp.url} is not a temporary of this process")
    check_ours(dest, marker, setting=setting, remedy=remedy)
    if dest.is_local:
        if os.path.lexists(dest.path):
            with scratch(dest) as old:
                os.rmdir(old.path)
                os.replace(dest.path, old.path)
                try:
                    os.replace(tmp.path, dest.path)
                except BaseException:
                    os.replace(old.path, dest.path)  # the previous copy back where it was
                    raise
        else:
            os.makedirs(posixpath.dirname(dest.path), exist_ok=True)
            os.replace(tmp.path, dest.path)
        _SCRATCH.discard(tmp.url)
        return
    _remove(dest)
    fs = tmp.fs
    fs.invalidate_cache(tmp.path)
    files = sorted(fs.find(tmp.path), key=lambda p: posixpath.basename(p) == marker.name)  # marker last
    for src in files:
        fs.copy(src, posixpath.join(dest.path, posixpath.relpath(src, tmp.path)))
    _remove(tmp)
