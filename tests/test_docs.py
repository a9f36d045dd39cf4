"""The first contact: a README read in ten minutes whose commands and links work, and the
documentation site, built strictly (a broken link or a page left out of the nav fails), with the
config reference generated from the typed config."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _commands() -> list[list[str]]:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                out.append(shlex.split(line))
    return out


def test_the_readme_reads_in_ten_minutes_and_its_links_resolve():
    text = README.read_text()
    words = len(re.sub(r"```.*?```", "", text, flags=re.S).split())  # prose; commands are read differently
    assert words <= 1500, words
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links and all((ROOT / link).exists() for link in links), [x for x in links if not (ROOT / x).exists()]


def test_every_command_the_readme_shows_runs_as_help_or_a_dry_run(tmp_path):
    """make targets exist; jobs compose their config with the README's overrides (Hydra's
    `--cfg job`: every key named exists); the CLI's subcommands answer --help; files named exist."""
    makefile = (ROOT / "Makefile").read_text()
    seen = set()
    for cmd in _commands():
        while cmd and re.fullmatch(r"[A-Z_]+=\S*", cmd[0]):  # VAR=value before the command
            cmd = cmd[1:]
        exe = cmd[0].removeprefix(".venv/bin/")
        if exe == "make":
            assert re.search(rf"^{cmd[1]}:", makefile, flags=re.M), cmd
        elif exe == "python":
            job = ROOT / cmd[1]
            assert job.exists(), cmd
            run = subprocess.run([sys.executable, str(job), *cmd[2:], "--cfg", "job"], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, (cmd, run.stderr[-2000:])
        elif exe == "cousins":
            words = cmd[1:3] if cmd[1] == "query" else cmd[1:2]
            run = subprocess.run([sys.executable, "-m", "cousins.cli", *words, "--help"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 0 and "usage:" in run.stdout, (cmd, run.stderr[-2000:])
        elif exe == "serve":
            assert (ROOT / cmd[2]).exists(), cmd
        else:
            pytest.fail(f"the README shows a command this test does not know how to check: {cmd}")
        seen.add(exe)
    assert {"make", "python", "cousins", "serve"} <= seen


def test_the_config_reference_is_current():
    """docs/reference/config.md is what scripts/config_reference.py writes from the typed config."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_the_documentation_site_builds_strictly(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()
