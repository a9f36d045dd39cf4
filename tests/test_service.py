"""The query service over real HTTP: Ray Serve on 127.0.0.1 with two applications, one over a
`file://` root (token required) and one over the S3 test server (no token), both holding the
hand-written runs of test_query_cli.py. Then a schemathesis fuzz of the live OpenAPI document
(zero 5xx), path traversal attempts, and the latency of a drift page.

One Ray and one Serve for the module; Serve is shut down at the end."""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import sys
import time
from urllib.parse import quote

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from conftest import ROOT
from cousins.query.drift import drift_page
from cousins.query.inputs import MAX_LIMIT, MAX_OFFSET
from cousins.run.storage import resolve
from test_query_cli import DRIFT_RUN, FAILED_RUN, GEN_RUN, ODD_ID, PENDING_RUN, write_runs

if str(ROOT) not in sys.path:  # services/ lives beside the package, in the checkout (as for `serve run`)
    sys.path.insert(0, str(ROOT))

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TOKEN = "query-test-token-3f9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FUZZ = {"cases": 0, "server_errors": [], "by_status": {}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, port: int, file_root, s3_root, file_runs):
        self.port, self.file_root, self.s3_root, self.file_runs = port, file_root, s3_root, file_runs
        self.base = f"http://127.0.0.1:{port}"
        self.http = requests.Session()

    def get(self, path: str, *, auth: bool = True, **params) -> requests.Response:
        return self.http.get(self.base + path, params=params or None, headers=AUTH if auth else None, timeout=60)

    def raw(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        """A request whose path goes on the wire exactly as written (no client normalisation)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def service(ray_local, s3_server, tmp_path_factory):
    import s3fs
    from ray import serve

    from services.query_app import QueryService

    file_root = resolve(str(tmp_path_factory.mktemp("service") / "out"))
    file_runs = write_runs(file_root, prompts=400, rows_per_file=200)  # 2400 drift rows, 4 files a cousin
    s3fs.S3FileSystem().mkdir("query-service")
    s3_root = resolve("s3://query-service/cousins")
    write_runs(s3_root, prompts=30, rows_per_file=25)

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # The token reaches the replica through its environment, as in infra/serve.yaml.
        serve.run(QueryService.options(ray_actor_options={"num_cpus": 0, "runtime_env": {
            "env_vars": {"COUSINS_API_TOKEN": TOKEN}}}).bind(storage_root=file_root.url),
            name="files", route_prefix="/")
        serve.run(QueryService.options(name="QueryServiceS3", ray_actor_options={"num_cpus": 0})
                  .bind(storage_root=s3_root.url), name="s3", route_prefix="/s3")
        yield Service(port, file_root, s3_root, file_runs)
    finally:
        serve.shutdown()


def test_the_serve_config_is_valid(monkeypatch):
    """infra/serve.yaml is a valid Serve config whose import path builds the app; the builder
    takes the root from COUSINS_STORAGE_ROOT and makes a local path absolute where it runs."""
    import yaml
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from services import query_app

    cfg = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "infra" / "serve.yaml").read_text()))
    (app,) = cfg.applications
    assert cfg.http_options.host == "127.0.0.1" and app.route_prefix == "/"
    assert import_attr(app.import_path) is query_app.build
    monkeypatch.delenv("COUSINS_STORAGE_ROOT", raising=False)
    with pytest.raises(ValueError, match="COUSINS_STORAGE_ROOT"):
        query_app.build(app.args)
    monkeypatch.setenv("COUSINS_STORAGE_ROOT", "outputs")
    monkeypatch.chdir(ROOT)
    bound = query_app.build(app.args)._bound_deployment.init_kwargs
    assert bound["storage_root"] == str(ROOT / "outputs")
    with pytest.raises(ValueError, match="unknown arguments"):
        query_app.build({"storage_rot": "x"})


def test_health_readiness_and_docs_need_no_token(service):
    assert service.get("/healthz", auth=False).json() == {"status": "ok"}
    assert service.get("/readyz", auth=False).json() == {"status": "ready"}
    spec = service.get("/openapi.json", auth=False).json()
    assert {"/runs", "/runs/{run_id}/drift", "/runs/{run_id}/summary/{cousin}", "/healthz"} <= set(spec["paths"])
    assert "swagger" in service.get("/docs", auth=False).text.lower()
    assert service.get("/s3/readyz", auth=False).json() == {"status": "ready"}


def _data_paths(spec: dict) -> list[str]:
    """Every data endpoint of the spec with valid parameters filled in."""
    fill = {"{run_id}": DRIFT_RUN, "{cousin}": "q8", "{prompt_id}": quote(ODD_ID, safe="")}
    out = []
    for path in spec["paths"]:
        if path in ("/healthz", "/readyz"):
            continue
        for k, v in fill.items():
            path = path.replace(k, v)
        out.append(path)
    return out


def test_the_token_guards_every_data_endpoint(service):
    spec = service.get("/openapi.json", auth=False).json()
    paths = _data_paths(spec)
    assert len(paths) >= 9
    for path in paths:
        assert service.get(path).status_code == 200, path
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic eDp5"}):
            status, h, body = service.raw(path, headers)
            assert status == 401, (path, headers, status)
            assert h.get("www-authenticate") == "Bearer" and "bearer token" in json.loads(body)["detail"]
    assert service.get("/s3/runs", auth=False).status_code == 200  # the S3 app has no token


@pytest.mark.parametrize("prefix", ["", "/s3"])
def test_only_committed_runs_are_visible(service, prefix):
    runs = service.get(f"{prefix}/runs").json()["runs"]
    assert {r["run_id"] for r in runs} == {DRIFT_RUN, GEN_RUN}
    for hidden in (PENDING_RUN, FAILED_RUN, "nope"):
        for tail in ("", "/manifest", "/config", "/summary", "/drift", "/report.html", f"/prompts/{ODD_ID}"):
            r = service.get(f"{prefix}/runs/{hidden}{tail}")
            assert r.status_code == 404 and "no committed run" in r.json()["detail"], (hidden, tail)
    run = service.get(f"{prefix}/runs/{DRIFT_RUN}").json()
    assert run["kind"] == "drift" and run["manifest"]["status"] == "committed"
    assert service.get(f"{prefix}/runs/{DRIFT_RUN}/config").json()["run"]["run_id"] == DRIFT_RUN


@pytest.mark.parametrize("prefix", ["", "/s3"])
def test_summary_drift_prompt_and_report(service, prefix):
    summary = service.get(f"{prefix}/runs/{DRIFT_RUN}/summary").json()
    assert [c["name"] for c in summary["cousins"]] == ["student", "q8"] and summary["noise_floor"]
    one = service.get(f"{prefix}/runs/{DRIFT_RUN}/summary/student").json()
    assert one["cousin"]["metrics"]["kld_mean"]["ci"] and one["noise_floor"]["name"] == "noise-floor"
    assert service.get(f"{prefix}/runs/{DRIFT_RUN}/summary/q4").status_code == 404
    assert service.get(f"{prefix}/runs/{GEN_RUN}/summary").status_code == 404

    root = service.file_root if prefix == "" else service.s3_root
    params = dict(cousin="student", category="arithmetic", flips_only="true", sort="chrf", order="asc", limit=7)
    got = service.get(f"{prefix}/runs/{DRIFT_RUN}/drift", **params).json()
    want = drift_page(root, DRIFT_RUN, cousin="student", category="arithmetic", flips_only=True,
                      sort="chrf", descending=False, limit=7)
    assert got == json.loads(json.dumps(want)) and got["rows"]
    top = service.get(f"{prefix}/runs/{DRIFT_RUN}/drift", limit=3, fields=["kld_mean", "kld_tokens"]).json()
    assert [set(r) for r in top["rows"]] == [{"cousin", "prompt_id", "sample_index", "kld_mean", "kld_tokens"}] * 3
    assert top["rows"][0]["kld_mean"] >= top["rows"][1]["kld_mean"] >= top["rows"][2]["kld_mean"]

    view = service.get(f"{prefix}/runs/{DRIFT_RUN}/prompts/{quote(ODD_ID, safe='')}").json()
    assert view["prompt"]["prompt_id"] == ODD_ID
    assert [g["model"] for g in view["samples"][0]["generations"]] == ["teacher", "q8", "student", "noise-floor"]
    assert service.get(f"{prefix}/runs/{DRIFT_RUN}/prompts/nope").status_code == 404

    r = service.get(f"{prefix}/runs/{DRIFT_RUN}/report.html")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"] and "drift report" in r.text


@pytest.mark.parametrize("params", [
    {"limit": 0}, {"limit": MAX_LIMIT + 1}, {"offset": -1}, {"offset": MAX_OFFSET + 1},
    {"sort": "kld_tokens"}, {"sort": "__import__('os').system('id')"}, {"metric": "original_text", "min": 1},
    {"metric": "nope"}, {"metric": "chrf", "min": "nan"}, {"metric": "chrf", "max": "inf"}, {"fields": "nope"},
    {"cousin": "../../etc"}, {"cousin": "/etc/passwd"}, {"cousin": "s3://other/x"}, {"cousin": ".hidden"},
    {"category": ""}, {"limit": "ten"}, {"flips_only": "maybe"}, {"limt": 5},
])
def test_bad_parameters_are_422_json(service, params):
    r = service.get(f"/runs/{DRIFT_RUN}/drift", **params)
    assert r.status_code == 422, (params, r.status_code, r.text[:200])
    assert r.headers["content-type"] == "application/json" and "Traceback" not in r.text and r.json()["detail"]


@pytest.mark.parametrize("path", [
    "/runs/..%2F..%2F..%2Fetc%2Fpasswd/manifest", "/runs/%2E%2E/manifest", "/runs/../../etc/passwd",
    "/runs/%2Fetc%2Fpasswd", "/runs/.hidden/config", "/runs/s3:%2F%2Fbucket%2Fx/manifest",
    "/runs/file:%2F%2F%2Fetc/config", f"/runs/{DRIFT_RUN}/summary/..%2F..%2Fmanifest.json",
    f"/runs/{DRIFT_RUN}/summary/%2E%2E", f"/runs/{DRIFT_RUN}/drift?cousin=..%2Fnoise-floor",
    f"/runs/{DRIFT_RUN}/prompts/..%2F..%2Fmanifest.json", "/runs/%00/manifest", "/runs/a%5Cb/config",
])
def test_traversal_attempts_are_refused(service, path):
    status, headers, body = service.raw(path, AUTH)
    assert status in (404, 422), (path, status, body[:200])
    assert headers.get("content-type") == "application/json"
    assert b"committed" not in body.replace(b"no committed run", b"") and b"root:" not in body


# --- fuzz -----------------------------------------------------------------------------------------


FUZZ_EXAMPLES = 8  # per operation and generation mode


def test_fuzz_the_openapi_spec(service):
    """Positive and negative cases of every operation of the live spec (schemathesis over
    hypothesis): never a 5xx, never a traceback, and every response conforms to the spec (status
    codes, content types, schemas). Driven by hand: schemathesis' pytest plugin needs pytest < 9."""
    from hypothesis import given
    from schemathesis import GenerationMode

    spec = schemathesis.openapi.from_url(f"{service.base}/openapi.json")
    operations = [result.ok() for result in spec.get_all_operations()]
    assert len(operations) >= 12
    plans = []
    for operation in operations:
        has_params = bool(operation.path_parameters or operation.query)
        for mode in (GenerationMode.POSITIVE, *([GenerationMode.NEGATIVE] if has_params else [])):
            plans.append((operation, mode, None))
            if "run_id" in {p.name for p in operation.path_parameters}:  # and over the real run, deeper
                plans.append((operation, mode, {"run_id": DRIFT_RUN}))
    for operation, mode, fixed in plans:
        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def one(case):
            response = case.call(base_url=service.base, headers=AUTH, timeout=60)
            FUZZ["cases"] += 1
            FUZZ["by_status"][response.status_code] = FUZZ["by_status"].get(response.status_code, 0) + 1
            if response.status_code >= 500:
                FUZZ["server_errors"].append(f"{case.method} {case.formatted_path} -> {response.status_code}")
            assert response.status_code < 500, (case.formatted_path, case.query, response.text[:300])
            assert "Traceback" not in response.text
            case.validate_response(response, headers=AUTH)

        one()
    print(f"\n[fuzz] {FUZZ['cases']} cases over {len(operations)} operations, {len(FUZZ['server_errors'])} 5xx; "
          f"statuses {sorted(FUZZ['by_status'].items())}")
    assert FUZZ["cases"] >= 100 and not FUZZ["server_errors"]


# --- latency --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/s3"])
def test_drift_page_latency(service, prefix):
    params = {"limit": 50, "sort": "kld_mean"}
    total = service.get(f"{prefix}/runs/{DRIFT_RUN}/drift", **params).json()["total"]
    times, n = [], 50 if prefix == "" else 20  # moto answers slowly; 20 pages tell the S3 figure
    for i in range(n):
        t0 = time.perf_counter()
        r = service.get(f"{prefix}/runs/{DRIFT_RUN}/drift", **{**params, "offset": (37 * i) % (total - 50)})
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200 and len(r.json()["rows"]) == 50
    med, p90 = statistics.median(times), statistics.quantiles(times, n=10)[-1]
    print(f"\n[latency {prefix or 'file'}] drift page of 50 over {total} rows: median {1000 * med:.1f} ms, "
          f"p90 {1000 * p90:.1f} ms ({n} requests)")
    assert med < 2.0


def test_the_token_comes_first_and_answers_carry_no_sniff_no_frame_and_no_host_redirect(service):
    """Without the token, bad parameters and unknown runs look alike (401); a trailing slash is
    served, never redirected to whatever Host the request named; every answer says nosniff and
    no framing, the report's CSP too."""
    status, h, body = service.raw("/runs?limt=5")
    assert status == 401 and h.get("www-authenticate") == "Bearer"
    status, h, _ = service.raw("/runs/no-such-run/drift?limit=0")
    assert status == 401
    status, h, body = service.raw("/runs/", {**AUTH, "Host": "evil.example"})
    assert status == 200 and "location" not in {k.lower() for k in h} and "runs" in json.loads(body)
    for path in ("/runs", "/healthz", f"/runs/{DRIFT_RUN}/summary"):
        status, h, _ = service.raw(path, AUTH)
        headers = {k.lower(): v for k, v in h.items()}
        assert status == 200 and headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    status, h, _ = service.raw(f"/runs/{DRIFT_RUN}/report.html", AUTH)
    assert status == 200 and "frame-ancestors 'none'" in {k.lower(): v for k, v in h.items()}["content-security-policy"]
    assert service.get("/runs?limt=5").status_code == 422  # with the token: the parameter is named
    every = {r["run_id"]: r["status"] for r in service.get("/runs", state="all").json()["runs"]}
    assert every[PENDING_RUN] == "in progress" and every[FAILED_RUN] == "failed" and every[DRIFT_RUN] == "committed"
