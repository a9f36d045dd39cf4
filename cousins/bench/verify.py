"""Driver memory of verifying a stage (`Run.verify`, as every generation and scoring stage ends):
synthetic generation stages of growing size, each verified and counted in a fresh process: its peak
RSS over its RSS before (Linux: /proc/self/clear_refs resets the peak after the imports). What grows
with the rows is what the driver keeps per row.

    PYTHONPATH=. .venv/bin/python -m cousins.bench.verify [--rows 1000000,4000000,8000000] [--dir /tmp/...]

The last line: `bytes_per_row=B` (the growth from the smallest to the largest stage, per row).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

PART_ROWS = 200_000  # rows a part file


def _make(stage_dir: str, rows: int) -> None:
    """A generation stage of `rows` rows (4 samples a prompt), its STAT columns filled."""
    from cousins.contract import schema
    from cousins.run.lifecycle import publish_part
    from cousins.run.storage import resolve

    out = resolve(stage_dir)
    for start in range(0, rows, PART_ROWS):
        i = np.arange(start, min(rows, start + PART_ROWS))
        n = len(i)
        t = pa.table({**{c: pa.nulls(n) for c in schema.GENERATIONS.names},
                      "prompt_id": pa.array([f"prompt-{x // 4:012d}" for x in i]), "model": pa.array(["m"] * n),
                      "sample_index": pa.array(i % 4, pa.int32()), "seed": pa.array(i, pa.int64()),
                      "prompt_tokens": pa.array(np.full(n, 50), pa.int32()),
                      "output_tokens": pa.array(i % 300, pa.int32()), "engine_time_s": pa.array(np.full(n, 0.1)),
                      "finish_reason": pa.array(["stop"] * n)})
        publish_part(schema.conform(t, schema.GENERATIONS), out=out)


def _measure(stage_dir: str, rows: int) -> None:
    """In this (fresh) process: verify the stage and print rows, wall, and its peak RSS over its RSS before."""
    from cousins.orchestrate.stages import stage_counts
    from cousins.run.lifecycle import Run
    from cousins.run.storage import resolve

    import pandas.util  # noqa: F401 - the hashing's import, paid once by any driver: not the stage's

    run = Run.__new__(Run)  # only its verification: no run directory
    object.__setattr__(run, "layout", type("Layout", (), {"run_id": "bench"})())
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here on (the imports' own is not the stage's)
        f.write("5")
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    counts = run.verify(resolve(stage_dir), rows, "the stage", fold=stage_counts)
    assert counts["rows"] == rows
    print(f"RESULT {rows} {time.perf_counter() - t0:.2f} {(_status_kib('VmHWM') - base) / 1024:.1f}", flush=True)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1000000,4000000,8000000")
    ap.add_argument("--dir", default=None, help="where the stages are written (default: a temporary directory)")
    ap.add_argument("--measure", nargs=2, metavar=("DIR", "ROWS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        _measure(a.measure[0], int(a.measure[1]))
        return
    sizes = sorted(int(x) for x in a.rows.split(","))
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        grown = {}
        for rows in sizes:
            stage = os.path.join(tmp, f"stage-{rows}")
            _make(stage, rows)
            line = subprocess.run([sys.executable, "-m", "cousins.bench.verify", "--measure", stage, str(rows)],
                                  capture_output=True, text=True, check=True).stdout.split("RESULT ")[-1].split()
            grown[rows] = float(line[2])
            print(f"{rows:>10,} rows: verified in {float(line[1]):.1f} s, driver's peak +{grown[rows]:.0f} MiB",
                  flush=True)
    lo, hi = sizes[0], sizes[-1]
    if hi > lo:
        print(f"bytes_per_row={(grown[hi] - grown[lo]) * 2**20 / (hi - lo):.1f}")


if __name__ == "__main__":
    main()
