"""Every manifest in infra/ is parsed and checked: against KubeRay's CRD schemas (kept in
../shared/kuberay-crds, not copied here), and against the project (real jobs, real config keys,
the GPUs the run will ask for)."""

from __future__ import annotations

import functools
import shlex

import pytest
import yaml

from conftest import ROOT, compose
from cousins.engine import plan
from cousins.contract.config import to_config
from cousins.engine.placement import NodeShape, check_fits

CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted((ROOT / "infra").rglob("*.yaml"))
KUBERAY = [m for m in MANIFESTS if yaml.safe_load(m.read_text()).get("apiVersion", "").startswith("ray.io/")]


@functools.lru_cache(maxsize=None)
def _crd_schemas() -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    out = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=loader)
        out[crd["spec"]["names"]["kind"]] = next(
            v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return out


def crd_schema(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (they are test data kept beside the project)")
    schemas = _crd_schemas()
    assert kind in schemas, f"no CRD for kind {kind} in {CRDS}"
    return schemas[kind]


def test_there_are_kuberay_manifests():
    assert {yaml.safe_load(m.read_text())["kind"] for m in KUBERAY} >= {"RayCluster", "RayJob", "RayService"}


def test_the_query_service_rayservice_serves_the_real_app_with_secrets_from_the_cluster():
    """infra/kuberay/rayservice.yaml: its serveConfigV2 is a valid Serve config whose import path is
    the query service's builder with an s3:// root, on CPU pods that take the token and the storage
    credentials from Secrets (none in the file)."""
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from services import query_app

    doc = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = serve_cfg.applications
    assert import_attr(app.import_path) is query_app.build and app.args["storage_root"].startswith("s3://")
    assert serve_cfg.http_options.port == 8000
    cluster = doc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        c = pod["spec"]["containers"][0]
        assert _gpus(c) == 0
        assert {"secretRef": {"name": "cousins-s3"}} in c["envFrom"]
        assert {"secretRef": {"name": "cousins-query"}} in c["envFrom"]  # COUSINS_API_TOKEN
    head = pods[0]["spec"]["containers"][0]
    assert head["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    text = (ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text()
    assert "COUSINS_API_TOKEN=" not in text.replace("--from-literal=COUSINS_API_TOKEN=", "")


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_manifest_validates_against_the_kuberay_crd(path):
    import jsonschema

    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    errors = sorted(jsonschema.Draft7Validator(crd_schema(doc["kind"])).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def test_a_manifest_with_a_typo_is_caught():
    """The check itself can fail: an unknown field where the CRD allows none is reported."""
    import jsonschema

    doc = yaml.safe_load((ROOT / "infra" / "kuberay" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert list(jsonschema.Draft7Validator(crd_schema("RayCluster")).iter_errors(doc))


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


ENGINE_CLUSTERS = [m for m in KUBERAY if yaml.safe_load(m.read_text())["kind"] in ("RayCluster", "RayJob")]


@pytest.mark.parametrize("path", ENGINE_CLUSTERS, ids=lambda p: p.name)
def test_gpu_workers_autoscale_and_request_gpus(path):
    spec = _cluster_spec(yaml.safe_load(path.read_text()))
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _gpus(head) == 0 and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["minReplicas"] < g["maxReplicas"] for g in groups)
    assert all(_gpus(g["template"]["spec"]["containers"][0]) >= 1 for g in groups)
    for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]:
        env_from = pod["spec"]["containers"][0].get("envFrom", [])
        assert {"secretRef": {"name": "cousins-s3"}} in env_from  # credentials from a Secret only


@pytest.mark.parametrize("path", [m for m in KUBERAY if yaml.safe_load(m.read_text())["kind"] == "RayJob"],
                         ids=lambda p: p.name)
def test_rayjob_entrypoint_runs_a_real_job_with_real_config_and_fits_the_gpus(path):
    doc = yaml.safe_load(path.read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), argv[:2]
    cfg = to_config(compose(*argv[2:]))  # every override names a real config key or group
    assert cfg.engine.gpus_per_actor >= 1 and cfg.storage.root.startswith("s3://")
    # The job's own fit check on the nodes the cluster can grow to (every worker group at its maxReplicas).
    shapes = []
    for group in _cluster_spec(doc)["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        shapes += [NodeShape(gpus=_gpus(group["template"]["spec"]["containers"][0]),
                             cpus=float(limits["cpu"]))] * group["maxReplicas"]
    assert "hold" in check_fits(plan.placement(cfg), shapes)


def test_the_image_installs_the_gpu_extra():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert '".[gpu]"' in text and "rayproject/ray:2.60.0" in text and "-c constraints/gpu.txt" in text


VM_CLUSTER = ROOT / "infra" / "vm" / "cluster.yaml"


def _launcher_schema() -> dict:
    import json
    import os

    import ray

    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


def test_vm_cluster_launcher_config_validates_against_rays_schema():
    import jsonschema

    doc = yaml.safe_load(VM_CLUSTER.read_text())
    validator = jsonschema.Draft7Validator(_launcher_schema())
    errors = sorted(validator.iter_errors(doc), key=str)
    assert not errors, "\n".join(e.message for e in errors[:10])
    bad = yaml.safe_load(VM_CLUSTER.read_text())
    bad["available_node_types"]["gpu-worker"]["min_workers"] = "none"  # the check itself can fail
    assert list(validator.iter_errors(bad))


def test_vm_cluster_autoscales_gpu_workers_behind_a_driver_only_head():
    doc = yaml.safe_load(VM_CLUSTER.read_text())
    head = doc["available_node_types"][doc["head_node_type"]]
    workers = [t for n, t in doc["available_node_types"].items() if n != doc["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert workers and all(w["min_workers"] < w["max_workers"] <= doc["max_workers"] for w in workers)
    assert all(w["resources"].get("GPU", 0) >= 1 for w in workers)
    kuberay_image = yaml.safe_load((ROOT / "infra" / "kuberay" / "raycluster.yaml").read_text())[
        "spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert doc["docker"]["image"] == kuberay_image  # one image for both ways of running a cluster
    text = VM_CLUSTER.read_text().lower()
    assert "aws_secret_access_key" not in text and "ray stop" not in text
