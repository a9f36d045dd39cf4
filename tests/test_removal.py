"""The one rule for removal (cousins/run/removal.py): only what carries the project's marker, an
empty or absent location, or this process's own temporary is ever removed or replaced; anything
else is refused in one line naming the location and the setting. On local disks and on a real
S3-speaking server. And the package itself removes trees through that module only."""

from __future__ import annotations

import ast
import json
import os
import pathlib

import pytest

from cousins.run import removal
from cousins.run.removal import EXPORT, NotOurs, publish_dir, remove_tree, scratch
from cousins.run.storage import resolve

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "cousins"
EXPORT_RECORD = json.dumps({"rows": 1, "files": [{"name": "part-0.parquet", "rows": 1, "bytes": 9}]})


def _plant(d: pathlib.Path, name="notes.txt", text="mine") -> pathlib.Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)
    return d / name


def test_a_users_directory_is_refused_in_one_line_and_left_whole(tmp_path):
    mine = _plant(tmp_path / "data")
    with pytest.raises(NotOurs) as e:
        remove_tree(tmp_path / "data", EXPORT, setting="out")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("out: ") and str(tmp_path / "data") in msg
    assert "never deletes or overwrites" in msg and "_SUCCESS" in msg
    assert mine.read_text() == "mine"


def test_a_foreign_marker_of_the_same_name_is_not_ours(tmp_path):
    """A Spark or Hadoop output has an empty _SUCCESS too: the name alone proves nothing."""
    spark = _plant(tmp_path / "spark", "_SUCCESS", "")
    _plant(tmp_path / "spark", "part-00000.parquet", "rows")
    with pytest.raises(NotOurs):
        remove_tree(tmp_path / "spark", EXPORT, setting="out")
    assert spark.exists()
    cfg = _plant(tmp_path / "run", "config.yaml", "learning_rate: 3\n")
    _plant(tmp_path / "run" / "prompts")
    with pytest.raises(NotOurs):
        remove_tree(tmp_path / "run" / "prompts", removal.RUN, owner=resolve(str(tmp_path / "run")), setting="run.run_id")
    assert cfg.exists() and (tmp_path / "run" / "prompts" / "notes.txt").exists()


def test_absent_empty_and_marked_locations_are_removed(tmp_path):
    remove_tree(tmp_path / "absent", EXPORT, setting="out")  # nothing there: nothing to do
    (tmp_path / "empty").mkdir()
    remove_tree(tmp_path / "empty", EXPORT, setting="out")
    assert not (tmp_path / "empty").exists()
    _plant(tmp_path / "ours", "_SUCCESS", EXPORT_RECORD)
    _plant(tmp_path / "ours", "part-0.parquet", "x")
    remove_tree(tmp_path / "ours", EXPORT, setting="out")
    assert not (tmp_path / "ours").exists()


def test_a_file_or_a_link_where_a_directory_goes_is_never_replaced(tmp_path):
    f = _plant(tmp_path, "export", "a file of mine")
    with pytest.raises(NotOurs):
        remove_tree(f, EXPORT, setting="out")
    target = _plant(tmp_path / "real", "_SUCCESS", EXPORT_RECORD).parent
    os.symlink(target, tmp_path / "link")
    with pytest.raises(NotOurs):
        remove_tree(tmp_path / "link", EXPORT, setting="out")
    assert f.exists() and (target / "_SUCCESS").exists()


def test_a_stage_is_removed_only_inside_a_run_the_project_wrote(tmp_path):
    import yaml

    run = tmp_path / "runs" / "r1"
    _plant(run, "config.yaml", yaml.safe_dump({"run": {}, "model": {}, "storage": {}, "corpus": {}}))
    _plant(run / "prompts", "part-x.parquet", "rows")
    remove_tree(run / "prompts", removal.RUN, owner=resolve(str(run)), setting="run.run_id")
    assert not (run / "prompts").exists() and (run / "config.yaml").exists()
    with pytest.raises(ValueError, match="does not hold"):
        remove_tree(tmp_path / "elsewhere", removal.RUN, owner=resolve(str(run)), setting="run.run_id")


def test_scratch_is_removed_on_failure_and_publish_replaces_only_our_own(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with scratch(dest) as tmp:
            _plant(pathlib.Path(tmp.path), "half", "written")
            raise RuntimeError("the export failed half way")
    assert list(tmp_path.iterdir()) == []  # nothing left beside it
    for version in ("one", "two"):  # a new location, then a previous export of the project's
        with scratch(dest) as tmp:
            _plant(pathlib.Path(tmp.path), "part-0.parquet", version)
            _plant(pathlib.Path(tmp.path), "_SUCCESS", EXPORT_RECORD)
            publish_dir(tmp, dest, EXPORT, setting="out")
        assert (dest / "part-0.parquet").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    mine = _plant(tmp_path / "users", "notes.txt")
    with pytest.raises(NotOurs):
        with scratch(tmp_path / "users") as tmp:
            _plant(pathlib.Path(tmp.path), "_SUCCESS", EXPORT_RECORD)
            publish_dir(tmp, tmp_path / "users", EXPORT, setting="out")
    assert mine.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out", "users"]


def test_only_this_processs_scratch_counts_as_a_temporary(tmp_path):
    other = _plant(tmp_path / ".out.cousins-tmp-0123456789ab", "data")  # another process's, or a user's
    with pytest.raises(ValueError, match="not a temporary of this process"):
        publish_dir(resolve(str(other.parent)), tmp_path / "out", EXPORT, setting="out")
    with pytest.raises(NotOurs):
        remove_tree(other.parent, EXPORT, setting="out")
    assert other.exists()


def test_on_s3_a_prefix_is_replaced_only_when_it_holds_our_export_and_the_marker_lands_last(s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = f"removal-{os.getpid()}"
    fs.mkdir(bucket)
    fs.pipe_file(f"{bucket}/users/notes.txt", b"mine")
    with pytest.raises(NotOurs) as e:
        remove_tree(f"s3://{bucket}/users", EXPORT, setting="out")
    assert f"s3://{bucket}/users" in str(e.value)
    dest = f"s3://{bucket}/sft"
    for version in (b"one", b"two"):
        with scratch(resolve(dest)) as tmp:
            tmp.join("part-0.parquet").write_bytes_atomic(version)
            tmp.join("_SUCCESS").write_bytes_atomic(EXPORT_RECORD.encode())
            publish_dir(tmp, dest, EXPORT, setting="out")
        fs.invalidate_cache()
        assert fs.cat_file(f"{bucket}/sft/part-0.parquet") == version
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(bucket)) == ["_SUCCESS", "notes.txt", "part-0.parquet"]
    modified = {p.rsplit("/", 1)[-1]: fs.info(p)["LastModified"] for p in fs.find(f"{bucket}/sft")}
    assert modified["_SUCCESS"] >= modified["part-0.parquet"]


def test_the_package_removes_trees_only_through_the_removal_module():
    """One owner: shutil.rmtree, an fsspec rm and os.rmdir appear in cousins/run/removal.py only."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "removal.py" and path.parent.name == "run":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("rmtree", "rm", "rmdir", "removedirs"):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.func.attr}")
    assert not found, "recursive removals outside cousins/run/removal.py:\n" + "\n".join(found)
