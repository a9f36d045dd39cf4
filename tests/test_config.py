"""Every YAML in conf/ composes into the typed config and validates; errors come all at once."""

from pathlib import Path

import pytest

from conftest import ROOT, compose
from cousins.contract.config import DEMO_PATH, Config, ConfigError, resolve_paths, to_config
from cousins.contract.validate import validate

GROUPS = sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir())


def choices():
    for group in GROUPS:
        for f in sorted(group.glob("*.yaml")):
            yield f"{group.name}={f.stem}"


@pytest.mark.parametrize("choice", list(choices()))
def test_every_conf_file_composes_and_validates(choice, tiny_teacher):
    overrides = [choice]
    if not choice.startswith("model="):
        overrides.append(f"model.path={tiny_teacher}")
    group, name = choice.split("=")
    if "path: ???" in (ROOT / "conf" / group / f"{name}.yaml").read_text():  # a preset: the user names the data
        overrides.append(f"corpus.path={DEMO_PATH}")
    cfg = resolve_paths(to_config(compose(*overrides)))
    assert isinstance(cfg, Config)
    if choice.startswith("model="):
        cfg.model.path = tiny_teacher  # model files point at models/…, built by the fixture
    validate(cfg)


def test_conf_groups_are_the_documented_ones():
    assert {g.name for g in GROUPS} >= {"model", "corpus", "run", "storage"}


def test_defaults_compose_to_the_demo():
    cfg = to_config(compose())
    assert cfg.model.name == "tiny-teacher" and cfg.model.build == "tiny-teacher"
    assert cfg.corpus.path.endswith("cousins/data/demo.jsonl")
    assert cfg.run.samples == 2 and cfg.run.sampling.logprobs == 5
    assert cfg.storage.root == "outputs"


def test_overrides_reach_the_typed_config():
    # Key overrides apply after the group's file, whatever their order on the command line.
    cfg = to_config(compose("run.samples=4", "engine.num_actors=3", "run=greedy"))
    assert cfg.run.samples == 4 and cfg.run.sampling.temperature == 0.0 and cfg.engine.num_actors == 3


def test_every_error_is_reported_at_once(tmp_path):
    cfg = to_config(compose(
        f"model.path={tmp_path / 'no-model'}", "model.build=null", f"corpus.path={tmp_path / 'no.jsonl'}",
        "run.samples=0", "run.sampling.top_p=1.5", "run.sampling.logprobs=50", "engine.num_actors=0",
        "model.dtype=int3", "run.run_id=../escape"))
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    problems = info.value.problems
    text = str(info.value)
    assert len(problems) == 8, text
    for needle in ("no-model", "no.jsonl", "run.samples", "top_p", "logprobs", "num_actors", "dtype", "run_id"):
        assert needle in text


def test_relative_paths_resolve_against_the_start_directory(tmp_path):
    cfg = resolve_paths(to_config(compose("model.path=m", "corpus.path=c.jsonl", "storage.root=out")), str(tmp_path))
    assert cfg.model.path == str(tmp_path / "m") and cfg.corpus.path == str(tmp_path / "c.jsonl")
    assert cfg.storage.root == str(tmp_path / "out")
    cfg = resolve_paths(to_config(compose("storage.root=s3://bucket/x")), str(tmp_path))
    assert cfg.storage.root == "s3://bucket/x"


def test_redacted_config_drops_secrets():
    from cousins.contract.redact import redacted

    cfg = to_config(compose("+storage.options.secret=hunter2", "+storage.options.key=AKIA",
                            "+storage.options.client_kwargs.aws_session_token=tok",
                            "+storage.options.client_kwargs.endpoint_url=http://127.0.0.1:9"))
    data = redacted(cfg)
    assert data["storage"]["options"] == {"secret": "***", "key": "***", "client_kwargs": {
        "aws_session_token": "***", "endpoint_url": "http://127.0.0.1:9"}}
    assert "hunter2" not in str(data) and "AKIA" not in str(data)
    assert data["run"]["sampling"]["max_tokens"] == 64  # not a secret for containing "token"


def test_redaction_covers_key_ids_connection_strings_headers_and_passwords_in_urls():
    from cousins.contract.redact import redacted

    cfg = to_config(compose("+storage.options.aws_access_key_id=AKIAX", "+storage.options.connection_string=cs1",
                            "+storage.options.client_kwargs.headers.Authorization=Bearer-abc",
                            "storage.root=https://alice:s3cr3t@example.com/bucket", "+storage.options.sas_token=sv1"))
    data = redacted(cfg)
    opts = data["storage"]["options"]
    assert opts["aws_access_key_id"] == opts["connection_string"] == opts["sas_token"] == "***"
    assert opts["client_kwargs"]["headers"]["Authorization"] == "***"
    assert data["storage"]["root"] == "https://alice:***@example.com/bucket"
    for secret in ("AKIAX", "cs1", "Bearer-abc", "s3cr3t", "sv1"):
        assert secret not in str(data), secret


def test_the_job_reports_config_errors_before_ray(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "generate.py"), "run.samples=0", "engine.batch_size=0",
         f"corpus.path={tmp_path / 'missing.jsonl'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "run.samples must be >= 1" in proc.stderr and "engine.batch_size" in proc.stderr
    assert "missing.jsonl" in proc.stderr
    assert "Started a local Ray" not in proc.stdout + proc.stderr
    assert not Path(tmp_path / "outputs").exists()


@pytest.mark.parametrize("name", ["generate", "drift", "benchmark"])
def test_every_job_config_composes_and_validates(name, tiny_teacher):
    cfg = resolve_paths(to_config(compose(f"model.path={tiny_teacher}", config_name=name)))
    validate(cfg)


def test_export_config_composes():
    from omegaconf import OmegaConf

    from cousins.export.config import ExportConfig

    cfg = OmegaConf.to_object(compose("run_id=r1", "kd=true", "filters.near_dedup=true", config_name="export"))
    assert isinstance(cfg, ExportConfig) and cfg.kd and cfg.filters.near_dedup and cfg.storage.root == "outputs"


def test_one_name_rule_for_models_cousins_and_run_ids_in_the_config_and_the_query():
    import dataclasses

    from cousins.contract.config import ConfigError, CousinConfig
    from cousins.contract.validate import validate
    from cousins.query.inputs import BadInput, check_name

    cfg = to_config(compose())
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="my model"),
                              run=dataclasses.replace(cfg.run, run_id="café\n"),
                              cousins={**cfg.cousins, "q@x": CousinConfig(kind="quantized")})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    problems = str(e.value)
    assert "model.name 'my model'" in problems and "run.run_id 'café\\n'" in problems and "'q@x'" in problems
    for bad in ("x\n", "my model", "café", ".hidden", "a/b", ""):
        with pytest.raises(BadInput):
            check_name(bad, "run id")
    assert check_name("rtn-int8.v2_1", "cousin") == "rtn-int8.v2_1"


def test_a_submission_that_would_lose_its_run_is_refused_before_contacting_the_cluster(capsys):
    """The default storage.root is relative: in a submitted job it would land in the job's temporary
    working dir on the head. Refused with the remedy, without reaching the (absent) cluster."""
    from cousins.cli import main

    for job, extra in (("generate", []), ("drift", ["storage.root=runs-here"]), ("export", ["run_id=r"])):
        assert main(["submit", "--address", "http://127.0.0.1:9", "--job", job, "--", *extra]) == 2
        err = capsys.readouterr().err
        assert "is relative" in err and "storage.root=s3://" in err and "lost when the job ends" in err, err
    from cousins.orchestrate.submit import check_storage_root

    assert check_storage_root("s3://bucket/cousins") is None and check_storage_root("/mnt/shared/c") is None
