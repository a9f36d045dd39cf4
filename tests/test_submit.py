"""Submission that fails says why in one line: a Python without the project (the preflight), a
cluster whose dashboard answers but whose job agent never takes the job, no cluster at all.
A real head and a real submission are in test_cluster.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cousins.orchestrate import preflight
from cousins.orchestrate import submit

ROOT = Path(__file__).resolve().parent.parent


def test_the_preflight_passes_here_and_names_what_a_bare_python_lacks():
    assert preflight.problems("generate") == []
    bare = os.path.join(sys.base_prefix, "bin", "python3")  # this venv's base: none of the packages
    proc = subprocess.run([bare, "-m", "cousins.orchestrate.preflight", "export"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3 and proc.stdout == ""
    line, = proc.stderr.splitlines()
    assert line.startswith(f"error: the cluster's Python ({bare}) cannot run the export job: it lacks the packages ")
    assert "hydra-core" in line and "vLLM" not in line  # an export starts no engine
    assert "cousins submit --python PATH" in line


def test_the_preflight_checks_the_python_version_and_vllm(monkeypatch):
    assert preflight._python_ok(">=3.11,<3.12", (3, 11)) and not preflight._python_ok(">=3.11,<3.12", (3, 12))
    assert preflight.problems("export", (3, 10))[0] == "Python 3.10 (the project needs >=3.11,<3.12)"
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None)
    assert preflight.problems("drift")[-1].startswith("vLLM") and preflight.problems("export") == []


def test_the_entrypoint_runs_the_preflight_first():
    assert submit.entrypoint_of("drift", ["run.run_id=a b"], "/opt/py/bin/python") == (
        "/opt/py/bin/python -m cousins.orchestrate.preflight drift && /opt/py/bin/python jobs/drift.py 'run.run_id=a b'")


class _NoAgentDashboard(BaseHTTPRequestHandler):
    """What a head without a job agent answers: its version, package uploads, and 500 "No
    available agent" to every job submitted."""

    submits = 0

    def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        if self.path == "/api/version":
            self._send(200, json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x",
                                        "session_name": "s"}).encode())
        else:
            self._send(404, b"not found", "text/plain")  # no package uploaded yet

    def do_PUT(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(200, b"{}")

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).submits += 1
        self._send(500, b"No available agent to submit job, please try again later.", "text/plain")

    def log_message(self, *args):
        pass


@pytest.fixture
def no_agent_head():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoAgentDashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_cluster_without_a_job_agent_is_one_line_within_the_agent_wait(no_agent_head, monkeypatch, tmp_path):
    monkeypatch.setattr(submit, "AGENT_WAIT_S", 3.0)
    t0 = time.monotonic()
    with pytest.raises(submit.SubmitError) as e:
        submit.submit("generate", [f"storage.root={tmp_path}"], address=no_agent_head)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"the Ray cluster at {no_agent_head} has no job agent: none took "
                                              "the job within 3 s")
    assert _NoAgentDashboard.submits >= 2  # it was asked again while the wait lasted


def test_no_cluster_at_the_address_is_one_line():
    with pytest.raises(submit.SubmitError, match=r"^no Ray cluster answers at http://127.0.0.1:9: "):
        submit.submit("generate", ["storage.root=/mnt/shared/c"], address="http://127.0.0.1:9")
