"""The audit job (cousins/audit/run.py) on a local Ray with the fake engine and an OpenAI-compatible
fake server (tests/fake_server.py): the original behind the endpoint is found consistent, a cousin
behind it differs, the A/A calibration is measured, audit.json and the report are written, the
key reaches no file, a resume gives the committed verdict, and config problems and a dead URL are
reported before any cluster work. Real vLLM servers: tests/test_drift_vllm.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import cousins.contract.audit_config  # noqa: F401 - registers the audit job's config
from conftest import ROOT, TEST_API_KEY, TEST_API_KEY_ENV, compose
from cousins.audit.partition import group_of
from cousins.audit.report import table
from cousins.audit.run import AuditError, run_audit
from cousins.contract import codec
from cousins.contract.audit_config import as_run_config, problems, typed_audit
from cousins.contract.audit_record import Audit
from cousins.contract.config import resolve_paths, to_config
from cousins.run.lifecycle import committed
from cousins.run.storage import resolve
from fake_engine import FakeBackend
from fake_server import FakeServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def audit_config(tmp_path, server, served: str, *overrides: str):
    cfg = to_config(compose(
        f"model.path={tmp_path / 'teacher'}", f"storage.root={tmp_path / 'out'}", "run.samples=6",
        "run.sampling.max_tokens=8", "engine.batch_size=16", "audit.budget=240", "audit.permutations=199",
        "audit.resamples=50", "audit.calibration_groups=5", f"endpoint.url={server.url}", f"endpoint.model={served}",
        f"endpoint.api_key_env={TEST_API_KEY_ENV}", *overrides, config_name="audit"))
    found: list[str] = []
    cfg = resolve_paths(typed_audit(cfg, found))
    assert not found and not problems(cfg)
    return as_run_config(cfg)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("audit-models")
    s = FakeServer({"original": str(home / "teacher"), "int4": str(home / "int4")})
    s.home = home
    yield s
    s.stop()


def test_the_original_behind_an_endpoint_is_consistent_and_a_cousin_differs(ray_local, server):
    tmp = server.home
    same = run_audit(audit_config(tmp, server, "original", "run.run_id=same"), backend=FakeBackend())
    other = run_audit(audit_config(tmp, server, "int4", "run.run_id=other"), backend=FakeBackend())

    assert same["verdict"] == "consistent", table(same)
    assert other["verdict"] == "differs", table(other)
    by_name = {t["name"]: t for t in other["tests"]}
    # sampled texts, the first token's top-k, correctness on the demo's labelled prompts
    assert set(by_name) == {"mmd_hamming", "topk_logprobs", "mcnemar"}, table(other)
    print(table(same), table(other), sep="\n")
    assert by_name["topk_logprobs"]["reject"] and by_name["topk_logprobs"]["p_value"] <= 0.01
    for t in [*same["tests"], *other["tests"]]:
        assert 0 < t["p_value"] <= 1 and t["queries"] > 0 and t["effect_ci"][0] <= t["effect_ci"][1]
    # 240 requests of budget at 6 samples a prompt: 40 prompts, each sampled 6 times by the target
    assert same["prompts"] == 40 and same["spent"]["requests"] == 240 and same["spent"]["error_rows"] == 0
    aa = same["a_a"]
    assert aa["verdict"] == "consistent" and aa["groups"] == 5 and aa["false_positive_rate"] is not None
    assert aa["ci"][0] <= aa["false_positive_rate"] <= aa["ci"][1]

    run = committed(resolve(str(tmp / "out")), "same")
    data = json.loads(run.layout.audit.read_text())
    assert data == same and codec.encode(codec.decode(Audit, data)) == data
    assert "consistent" in run.layout.report.read_text()
    assert {m.name for m in run.typed().models} == {"tiny-teacher", "target", "noise-floor"}
    for dirpath, _, files in os.walk(run.layout.run.path):  # the key went out with every request, into no file
        for name in files:
            assert TEST_API_KEY.encode() not in open(os.path.join(dirpath, name), "rb").read(), name
    # a rerun of a committed audit reads its verdict back, sending nothing
    before = server.requests
    assert run_audit(audit_config(tmp, server, "original", "run.run_id=same"), backend=FakeBackend()) == same
    assert server.requests == before


def test_a_trusted_endpoint_can_be_the_reference(ray_local, server):
    """audit.reference_endpoint: the reference and its A/A sampled from a server too (no engine of
    ours); the int4 model behind the target is told from the original behind the reference."""
    tmp = server.home
    cfg = audit_config(tmp, server, "int4", "run.run_id=trusted", "audit.budget=120",
                       f"audit.reference_endpoint={{url: '{server.url}', model: original}}")
    before = server.requests
    out = run_audit(cfg, backend=FakeBackend())
    assert out["verdict"] == "differs" and out["reference"]["endpoint"] == f"{server.url} (model original)"
    assert server.requests - before == 3 * 120  # target, reference and noise floor: all through the server


def test_the_calibration_groups_split_the_prompts_stably():
    ids = [f"p{i}" for i in range(2000)]
    groups = [group_of(p, 10) for p in ids]
    assert groups == [group_of(p, 10) for p in ids]
    assert min(groups.count(g) for g in range(10)) > 150


def test_a_target_that_answers_nothing_ends_the_audit_with_its_error(ray_local, tmp_path):
    s = FakeServer({"original": str(tmp_path / "teacher")}, faults=lambda n, body: "400")
    try:
        cfg = audit_config(tmp_path, s, "original", "run.run_id=refused", "audit.budget=24")
        with pytest.raises(AuditError, match="answered none of its 24 requests.*this request is refused"):
            run_audit(cfg, backend=FakeBackend())
    finally:
        s.stop()


def _job(*overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "audit.py"), *overrides], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_config_problems_are_reported_at_once_before_any_cluster_work(tiny_teacher, tmp_path):
    p = _job(f"model.path={tiny_teacher}", f"storage.root={tmp_path}", "endpoint.url=localhost:8000",
             "endpoint.model=x", "endpoint.api_key_env=sk-123", "audit.alpha=2", "run.samples=1",
             "run.sampling.temperature=0")
    assert p.returncode != 0
    for what in ("endpoint.url 'localhost:8000' must start with http://", "endpoint.api_key_env 'sk-123'",
                 "audit.alpha must be in (0, 1)", "run.samples must be >= 2", "temperature must be > 0"):
        assert what in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_a_dead_url_fails_within_seconds_naming_it(tiny_teacher, tmp_path):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.perf_counter()
    p = _job(f"model.path={tiny_teacher}", f"storage.root={tmp_path}", f"endpoint.url={url}", "endpoint.model=x")
    assert p.returncode != 0 and f"- endpoint: " in p.stderr and f"{url}/models is unreachable" in p.stderr, p.stderr
    assert "cousins.target" not in p.stderr and "ray" not in p.stdout.lower()
    assert time.perf_counter() - t0 < 60  # Python, Hydra and the config: no Ray, no engine
    assert not os.path.exists(tmp_path / "runs")


def test_faults_at_the_endpoint_are_retried_or_kept_as_error_rows_and_a_resume_sends_nothing_twice(ray_local, tmp_path):
    """The target's server answers 429, 500, garbage or too slowly now and then (each retried and
    then answered), and always refuses one prompt (400: its rows are error rows with the server's
    message). The target's pass is done first, as an interrupted audit left it; the audit then
    resumes: the target gets no request again, every row is there once, and the verdict stands
    on the rows that answered."""
    from cousins.engine import plan
    from cousins.orchestrate.pipeline import generate_model, open_run, run_prompts
    from fake_engine import Tokenizer

    refused = Tokenizer().encode("What is 15 + 43?")  # the demo corpus's second prompt
    seen: dict[str, int] = {}

    def faults(n: int, body: dict):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and any(prompt[i:i + len(refused)] == refused for i in range(len(prompt))):
            return "400"
        key = json.dumps(body, sort_keys=True)
        seen[key] = seen.get(key, 0) + 1
        return {1: ("429", "500", "garbage", "stall")[n % 4]}.get(seen[key]) if n % 5 == 0 else None

    s = FakeServer({"original": str(tmp_path / "teacher")}, faults=faults)
    try:
        cfg = audit_config(tmp_path, s, "original", "run.run_id=faults", "endpoint.timeout_s=1")
        run = open_run(cfg)
        prompts, n, _ = run_prompts(cfg, run)
        target = plan.model_entries(cfg, noise_floor=True)[1]
        generate_model(cfg, run, prompts, n, target, FakeBackend(), seed=cfg.run.sampling.seed + 2)
        sent = s.requests
        out = run_audit(cfg, backend=FakeBackend())
        assert s.requests == sent  # the resume sent the target nothing
        assert sum(v >= 2 for v in seen.values()) >= 10  # faults retried and then answered
    finally:
        s.stop()
    run = committed(resolve(cfg.storage.root), "faults")
    rows = run.read(run.layout.generations("target"), ["prompt_id", "sample_index", "error"])
    keys = list(zip(rows.column("prompt_id").to_pylist(), rows.column("sample_index").to_pylist()))
    errors = [e for e in rows.column("error").to_pylist() if e]
    assert len(keys) == len(set(keys)) == out["prompts"] * 6 == out["spent"]["requests"]
    assert errors and out["spent"]["error_rows"] == len(errors) and len(errors) % 6 == 0  # one prompt's samples
    assert all("400" in e and "this request is refused" in e for e in errors), errors[:2]
    assert out["verdict"] == "consistent", table(out)


def test_the_audit_is_a_run_of_the_reference_the_target_and_the_prompts_its_budget_buys(tmp_path):
    cfg = to_config(compose(
        f"model.path={tmp_path / 'teacher'}", "endpoint.url=http://127.0.0.1:1/v1", "endpoint.model=served",
        "audit.budget=95", "run.samples=10", "corpus.limit=50",
        "audit.reference_endpoint={url: 'http://127.0.0.1:2/v1', model: trusted}", config_name="audit"))
    found: list[str] = []
    run_cfg = as_run_config(typed_audit(cfg, found))
    assert not found and not problems(cfg)
    assert run_cfg.corpus.limit == 9  # 95 requests buy 9 prompts of 10 samples (the corpus's 50 would be more)
    assert run_cfg.model.endpoint.url == "http://127.0.0.1:2/v1" and run_cfg.model.path == str(tmp_path / "teacher")
    assert list(run_cfg.cousins) == ["target"] and run_cfg.cousins["target"].endpoint.model == "served"
    assert cfg.model.endpoint is None  # the user's config is left as it was
