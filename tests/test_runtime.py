"""Keeping Ray's C++ log lines off the terminal (cousins.run.runtime.native_logs_off_terminal), in a
process of its own: what native code writes to descriptor 2 passes a filter, Python's writes go
straight through, and nothing written before exit is lost."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

SCRIPT = r"""
import os, sys
sys.path.insert(0, {root!r})
from cousins.run.runtime import native_logs_off_terminal
print("python before", file=sys.stderr, flush=True)
native_logs_off_terminal()
native_logs_off_terminal()  # once per process
os.write(2, b"[2026-12-07 01:14:34,832 E 28953 28953] core_worker.cc:2465: Actor with class name ...\n")
os.write(2, b"a native line of another kind\n[2026-12-07 01:14:35,001 W 1 2] src/ray/raylet/a.h:7: half")
os.write(2, b" of it\nnative, unfinished")
print("python after", file=sys.stderr)
sys.exit("error: the last line")
"""


def test_native_log_lines_are_dropped_and_everything_else_reaches_stderr():
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT))], capture_output=True, text=True,
                          timeout=60)
    err = proc.stderr
    assert proc.returncode == 1
    assert "core_worker.cc" not in err and "raylet/a.h" not in err and "half" not in err, err
    for line in ("python before", "a native line of another kind", "python after", "error: the last line",
                 "native, unfinished"):
        assert line in err, (line, err)
    assert err.index("python before") < err.index("python after") < err.index("error: the last line")
