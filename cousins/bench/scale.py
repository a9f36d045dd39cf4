"""The diff at scale: synthetic copies of a committed drift run, recomputed, measured.

`synthesize` writes a run N times the size of a committed drift run: every prompt, generation and
score row copied N times with suffixed prompt ids (`{id}~{k}`), one part file at a time (the run is
never loaded whole), plus its config, manifest and markers, and a `_SYNTHETIC.json` marker (written
first: only a copy carrying it is ever replaced by the next synthesis); its drift rows and summary are left to
be recomputed. `measure` recomputes a run in a fresh driver process (`python -m cousins.bench.scale`)
on the given Ray cluster and reports its wall time and the driver's peak RSS: what grows with N is
what the scale rules forbid.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cousins.run.lifecycle import committed
from cousins.run.layout import RunLayout, part_files, part_path
from cousins.run.removal import SYNTHETIC, remove_tree
from cousins.run.storage import Location, done_info, is_done, mark_done, resolve, write_parquet_atomic

SEP = "~"  # between a copied prompt id and its copy index


def _copies(table: pa.Table, factor: int) -> list[pa.Table]:
    ids = table.column("prompt_id")
    return [table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id",
                             pc.binary_join_element_wise(ids, pa.scalar(str(k)), SEP) if k else ids)
            for k in range(factor)]


def synthesize(root: Location, run_id: str, factor: int, *, out_id: str | None = None) -> str:
    """A copy of committed drift run `run_id` with every prompt `factor` times; returns its id."""
    src = committed(root, run_id)
    out_id = out_id or f"{run_id}-x{factor}"
    dst = RunLayout(root, out_id)
    # an earlier synthetic copy of that id is replaced; a real run (or anything else) never is
    remove_tree(dst.run, SYNTHETIC, setting=f"the scale benchmark's copy id {out_id!r}",
                remedy="Name another id for the copy")
    dst.run.join(SYNTHETIC.name).write_json_atomic({"source_run": run_id, "factor": factor})
    stages = [src.layout.prompts, src.layout.errors,
              *(src.layout.generations(m) for m in src.model_names()),
              *(src.layout.scores(m) for m in src.model_names())]
    for stage in stages:
        if not stage.exists():
            continue
        rel = stage.path[len(src.layout.run.path):].lstrip("/")
        out = dst.run.join(rel)
        rows = 0
        for i, f in enumerate(part_files(stage)):
            table = pq.read_table(f, filesystem=stage.arrow_fs())
            for k, copy in enumerate(_copies(table, factor)):
                write_parquet_atomic(copy, part_path(out, f"{i:05d}-{k:05d}"))
                rows += copy.num_rows
        marker = done_info(stage) if is_done(stage) else {}
        if "rows" in marker:
            marker["rows"] = rows
        mark_done(out, marker)
    dst.config.write_text_atomic(src.layout.config.read_text().replace(run_id, out_id))
    manifest = dict(src.manifest, run_id=out_id)
    manifest["corpus"] = {k: v * factor if isinstance(v, int) else v for k, v in manifest["corpus"].items()}
    dst.manifest.write_json_atomic(manifest)
    return out_id


def measure(root: str, run_id: str, address: str) -> dict:
    """Recompute `run_id`'s diff in a fresh driver on the cluster at `address`: wall seconds and the
    driver's peak RSS (MiB)."""
    proc = subprocess.run([sys.executable, "-m", "cousins.bench.scale", root, run_id, address],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"recompute of {run_id} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(root: str, run_id: str, address: str) -> None:
    import ray

    from cousins.contract.config import DriftConfig
    from cousins.drift.answers import Rule
    from cousins.drift.diff import recompute
    from cousins.drift.summary import BootstrapSpec

    d = DriftConfig()
    ray.init(address=address, log_to_driver=False)
    t0 = time.perf_counter()
    summary = recompute(resolve(root), run_id, rule=Rule(d.answer_match), worst_n=d.worst_n,
                        bootstrap=BootstrapSpec.of(d))
    wall = time.perf_counter() - t0
    print(json.dumps({"run_id": run_id, "prompts": summary["prompts"], "cousins": len(summary["cousins"]) + 1,
                      "wall_s": wall, "diff_s": summary["timings"]["diff_s"],
                      "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    _main(*sys.argv[1:4])
