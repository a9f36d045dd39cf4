"""Connecting to Ray: a cluster when one is named (or RAY_ADDRESS is set by `ray job submit`),
otherwise a fresh local Ray owned by this process."""

from __future__ import annotations

import io
import os
import re
import sys

from cousins.contract.config import LogConfig, RayConfig

# The job's log settings (process-wide, like logging's): init_ray sets them; the engine pools
# read them for their actors' environment (engine_env).
LOG = LogConfig()


# Storage and hub credentials and endpoints reach every worker through the job's runtime
# environment, never through the config, the manifest or the logs: the engine actors fetch models
# on their nodes (HF_TOKEN, HF_HUB_OFFLINE, HF_HOME where the nodes share it; COUSINS_MODEL_CACHE).
FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_", "HF_", "HUGGING_FACE_",
                          "COUSINS_MODEL_CACHE")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def configure_logs(log: LogConfig) -> None:
    """Quiet by default: Ray Data's operator dumps and progress, Ray's own info lines and the
    workers' output (vLLM's start-up chatter, harmless C++ errors on actor exit) stay in Ray's log
    files; the project's progress lines (cousins.run.progress) say how far a stage is. `log.verbose`
    brings all of it back."""
    import logging

    import ray.data

    from cousins.run import progress

    global LOG
    LOG = log
    progress.configure(every_s=log.progress_s)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = log.verbose
    ctx.enable_operator_progress_bars = log.verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if log.verbose else logging.ERROR)


def engine_env(base: dict[str, str]) -> dict[str, str]:
    """An engine actor's environment: vLLM logs warnings and worse only when verbose."""
    return {**base, "VLLM_LOGGING_LEVEL": "INFO" if LOG.verbose else "ERROR"}


# A line of Ray's C++ logging: "[2026-12-07 01:14:34,832 E 28953 28953] core_worker.cc:2465: ..."
NATIVE_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] [\w./-]+\.(cc|h):\d+: ")
_native_filter: list = []  # (the terminal's own descriptor, the pump thread) once installed


def _pump(read_fd: int, terminal: int) -> None:
    """Forward what native code writes to file descriptor 2, line by line, except Ray's C++ log lines."""
    pending = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not NATIVE_LOG_LINE.match(line))
            if kept:
                os.write(terminal, kept)
    if pending and not NATIVE_LOG_LINE.match(pending):
        os.write(terminal, pending)


def _restore_stderr() -> None:
    terminal, thread = _native_filter[0]
    sys.stderr.flush()
    os.dup2(terminal, 2)  # the pipe's last writer closes: the pump reads the end and stops
    thread.join(timeout=2)


def native_logs_off_terminal() -> None:
    """Keep Ray's C++ log lines off the terminal (they are in the session's log files already, e.g.
    python-core-driver-*.log; the driver's core worker copies its errors to stderr too, such as
    the one line per engine pool about actor constructor arguments in the object store). Python's
    own writes go straight to the terminal; what native code writes to descriptor 2 passes a
    filter thread that drops those lines. Undone at exit. Once per process; `log.verbose` skips it."""
    if _native_filter:
        return
    import atexit
    import threading

    sys.stderr.flush()
    try:
        terminal = os.dup(2)
    except OSError:  # no descriptor 2 to filter
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(terminal, "w", closefd=False)), write_through=True,
                                  encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace")
    thread = threading.Thread(target=_pump, args=(read_fd, terminal), name="cousins-native-stderr", daemon=True)
    thread.start()
    _native_filter.append((terminal, thread))
    atexit.register(_restore_stderr)


def init_ray(rc: RayConfig, log: LogConfig | None = None) -> None:
    import logging

    import ray

    log = log or LogConfig()
    configure_logs(log)
    if ray.is_initialized():
        return
    if not log.verbose:
        native_logs_off_terminal()
    quiet = {} if log.verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    runtime_env = {"env_vars": forwarded_env()}
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A driver started by `ray job submit` / `cousins submit`: the job's runtime env already
        # carries the working dir and the credentials, and Ray refuses a second one beside it.
        ray.init(address=address, **quiet)
        return
    if address:
        ray.init(address=address, runtime_env=runtime_env, **quiet)
        return
    # address="local" never attaches to a cluster some other process left running.
    ray.init(
        address="local",
        num_cpus=rc.num_cpus,
        object_store_memory=int(rc.object_store_gib * (1 << 30)) if rc.object_store_gib else None,
        include_dashboard=False,
        runtime_env=runtime_env,
        **quiet,
    )


def root_cause(e: BaseException) -> str:
    """The innermost error of a chain (Ray wraps task errors), as one line: 'Type: message'."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"
