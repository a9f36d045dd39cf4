"""Submit a job of this project to a running Ray cluster through the Job API (what
`ray job submit` does), follow its logs and report its final status."""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from pathlib import Path

from cousins.run.runtime import forwarded_env

ROOT = Path(__file__).resolve().parents[2]
# What never travels with the working dir: build outputs, local runs and models, the venv.
EXCLUDES = [".venv", ".git", "models", "outputs", "**/__pycache__", "*.egg-info", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 30.0  # a head that just started has its job agent within seconds; one that has none, never


class SubmitError(RuntimeError):
    """The cluster did not take the job; the message is one line that says why."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def entrypoint_of(job: str, overrides: list[str], python: str) -> str:
    """The job's command on the cluster: the preflight first (one line and exit when this Python
    lacks the project), then the job."""
    return f"{shlex.join([python, '-m', 'cousins.orchestrate.preflight', job])} && {shlex.join([python, f'jobs/{job}.py', *overrides])}"


def storage_root_of(job: str, overrides: list[str], working_dir: Path = ROOT) -> str:
    """The storage.root a job would get from its config and these overrides (composed here, as
    the job will compose it on the cluster)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import cousins.contract.audit_config  # noqa: F401 - registers the structured configs
    import cousins.contract.config  # noqa: F401
    import cousins.export.config  # noqa: F401

    with initialize_config_dir(config_dir=str(working_dir / "conf"), version_base=None):
        cfg = compose(config_name=job, overrides=[o for o in overrides if not o.startswith("hydra.")])
    return str(OmegaConf.select(cfg, "storage.root") or "")


def check_storage_root(root: str) -> str | None:
    """Why a submitted job must not write to `root`, or None. A job runs in a temporary copy of the
    checkout on the cluster: a relative root lands there and vanishes with the job."""
    if "://" in root:
        return None
    if not root.startswith("/"):
        return (f"storage.root {root!r} is relative: a submitted job runs in a temporary working directory "
                f"on the cluster, so its run would be written there and lost when the job ends. Give "
                f"storage.root=s3://BUCKET/PREFIX (or gs://, az://), or an absolute path on storage every "
                f"node mounts, e.g. storage.root=/mnt/shared/cousins")
    return None


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
    problem = check_storage_root(storage_root_of(job, overrides, working_dir))
    if problem:
        raise ValueError(problem)
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(f"no Ray cluster answers at {address or 'RAY_ADDRESS'}: {_first_line(e)} "
                          f"(give the dashboard's address, e.g. --address http://HEAD:8265)") from None
    entrypoint = entrypoint_of(job, overrides, python)
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": forwarded_env()}
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as e:
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2)  # a head that just started: its agent comes up in seconds
                continue
            if "No available agent" in str(e):
                raise SubmitError(
                    f"the Ray cluster at {client.get_address()} has no job agent: none took the job within "
                    f"{AGENT_WAIT_S:.0f} s. The head's dashboard agent did not start or died; see "
                    f"dashboard_agent.log in the head's Ray logs (/tmp/ray/session_latest/logs) and restart "
                    f"the head") from None
            raise SubmitError(f"the Ray cluster at {client.get_address()} refused the job: {_first_line(e)}") from None
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
