"""Submit a job of this project to a running Ray cluster through the Job API (what
`ray job submit` does), follow its logs and report its final status."""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from pathlib import Path

from cousins.runtime import forwarded_env

ROOT = Path(__file__).resolve().parent.parent
# What never travels with the working dir: build outputs, local runs and models, the venv.
EXCLUDES = [".venv", ".git", "models", "outputs", "**/__pycache__", "*.egg-info", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_TRIES = 30  # x 2 s


def submit(job: str, overrides: list[str], *, address: str | None, python: str = "python",
           working_dir: Path = ROOT, wait: bool = True, timeout_s: float | None = None,
           out=sys.stdout) -> tuple[str, str]:
    """Submit jobs/{job}.py with Hydra overrides; returns (submission id, status).

    The working dir (this checkout, minus EXCLUDES) is unpacked on every node; storage
    credentials from this shell's environment travel in the job's runtime env."""
    from ray.job_submission import JobSubmissionClient

    script = working_dir / "jobs" / f"{job}.py"
    if not script.is_file():
        raise FileNotFoundError(f"no job {job!r}: {script} does not exist")
    client = JobSubmissionClient(address)
    entrypoint = shlex.join([python, f"jobs/{job}.py", *overrides])
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": forwarded_env()}
    for attempt in range(AGENT_WAIT_TRIES):
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as e:  # a head that just started has no job agent for a few seconds
            if "No available agent" not in str(e) or attempt == AGENT_WAIT_TRIES - 1:
                raise
            time.sleep(2)
    print(f"submitted {job_id}: {entrypoint}", file=out, flush=True)
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    async def follow():
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(follow(), timeout_s))
    except asyncio.TimeoutError:
        pass
    status = str(client.get_job_status(job_id))
    while status.rsplit(".", 1)[-1] not in TERMINAL and (deadline is None or time.monotonic() < deadline):
        time.sleep(1)
        status = str(client.get_job_status(job_id))
    status = status.rsplit(".", 1)[-1]
    print(f"job {job_id}: {status}", file=out, flush=True)
    return job_id, status
