"""Behaviour drift: the original and its cousins generate on the same prompts and seeds, each
scores the original's outputs (teacher-forced), and every cousin is diffed against the original and
against the noise floor. Commits drift rows, summary.json and report.html with the run.

    python jobs/drift.py                                   # the demo: tiny teacher and its cousins
    python jobs/drift.py cousins=none +cousins.q.quantization=fp8_per_channel +cousins.q.kind=quantized
    python jobs/drift.py drift.recompute=true run.run_id=RUN   # redo the diff from stored rows only
"""

import sys

import hydra
from omegaconf import DictConfig

from cousins.orchestrate.accounting import summary_table
from cousins.contract.config import resolve_paths
from cousins.drift.answers import Rule
from cousins.drift.diff import recompute
from cousins.drift.summary import BootstrapSpec
from cousins.drift.table import drift_table
from cousins.orchestrate.jobkit import execute, start, typed
from cousins.orchestrate.pipeline import decode_summary, result_from_manifest, run_drift
from cousins.run.lifecycle import NotCommitted, RunState
from cousins.run.runtime import init_ray
from cousins.run.storage import resolve


@hydra.main(version_base=None, config_path="../conf", config_name="drift")
def main(dcfg: DictConfig) -> None:
    cfg = resolve_paths(typed(dcfg))  # absolute paths now: working dirs can move under Ray jobs
    if cfg.drift.recompute:
        d = cfg.drift
        if not cfg.run.run_id:
            sys.exit("error: drift.recompute needs run.run_id: the committed run to recompute")
        init_ray(cfg.ray, cfg.log)  # the diff runs on the cluster (or a local Ray), like every stage
        try:
            summary = recompute(resolve(cfg.storage.root, **cfg.storage.options), cfg.run.run_id,
                                bootstrap=BootstrapSpec.of(d),
                                rule=Rule.of_config(cfg), worst_n=d.worst_n)
        except (NotCommitted, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        print(drift_table(summary))
        print(f"drift of run {summary['run_id']} recomputed from stored generations and scores "
              f"in {summary['timings']['diff_s']:.1f} s")
        return
    run = start(cfg, scoring=True)
    if run.state is RunState.COMMITTED:
        print(summary_table(result_from_manifest(run)))
        print(drift_table(decode_summary(run)))
        return
    result, summary = execute(cfg, run, lambda: run_drift(cfg, run))
    print(summary_table(result))
    print(drift_table(summary))
    t = summary["timings"]
    print(f"generate {t['generate_s']:.1f} s, score {t['score_s']:.1f} s, diff {t['diff_s']:.1f} s, "
          f"report {t['report_s']:.1f} s; report: {run.layout.report.url}")


if __name__ == "__main__":
    main()
