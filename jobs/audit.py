"""Is this endpoint serving the original? A calibrated answer from samples of both.

    python jobs/audit.py endpoint.url=http://HOST:PORT/v1 endpoint.model=NAME          # against the tiny teacher
    python jobs/audit.py model=qwen2.5-7b endpoint.url=URL endpoint.model=NAME endpoint.api_key_env=KEY_VAR \
        audit.budget=2000 audit.alpha=0.05 run.run_id=audit-provider-x

Writes {storage.root}/runs/{run_id}/audit.json (verdict, tests, the A/A's measured false-positive
rate) and report.html; prints the verdict's table.
"""

import json

import hydra
from omegaconf import DictConfig

from cousins.audit.report import table
from cousins.audit.run import NAMES, AuditError, config_of, run_audit
from cousins.orchestrate.jobkit import execute, start
from cousins.run.lifecycle import RunState


@hydra.main(version_base=None, config_path="../conf", config_name="audit")
def main(dcfg: DictConfig) -> None:
    cfg, problems = config_of(dcfg)
    run = start(cfg, names=NAMES, problems=problems)  # every config problem at once, or exits
    if run.state is RunState.COMMITTED:
        print(table(json.loads(run.layout.audit.read_text())))
        return

    def body():
        try:
            return run_audit(cfg, run)
        except AuditError as e:
            raise SystemExit(f"error: audit {run.run_id}: {e}") from None

    print(table(execute(cfg, run, body)))


if __name__ == "__main__":
    main()
