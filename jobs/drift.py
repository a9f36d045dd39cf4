"""Behaviour drift: the original and its cousins generate on the same prompts and seeds, each
scores the original's outputs (teacher-forced), and every cousin is diffed against the original and
against the noise floor. Commits drift rows, summary.json and report.html with the run.

    python jobs/drift.py                                   # the demo: tiny teacher and its cousins
    python jobs/drift.py cousins=none +cousins.q.quantization=fp8_per_channel +cousins.q.kind=quantized
    python jobs/drift.py drift.recompute=true run.run_id=RUN   # redo the diff from stored rows only
"""

import json
import sys
import traceback

import hydra
from omegaconf import DictConfig

from cousins.config import ConfigError, resolve_paths, to_config, validate
from cousins.drift.stages import recompute
from cousins.drift.summary import drift_table
from cousins.family import build_students, check_vocabularies, prepare_before_ray
from cousins.pipeline import RunConflict, open_run, result_from_manifest, run_drift, summary_table
from cousins.runtime import init_ray, root_cause


@hydra.main(version_base=None, config_path="../conf", config_name="drift")
def main(dcfg: DictConfig) -> None:
    cfg = resolve_paths(to_config(dcfg))  # absolute paths now: working dirs can move under Ray jobs
    if cfg.drift.recompute:
        try:
            summary = recompute(cfg)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        print(drift_table(summary))
        print(f"drift of run {summary['run_id']} recomputed from stored generations and scores "
              f"in {summary['timings']['diff_s']:.1f} s")
        return
    try:
        validate(cfg)  # every config error at once, before any Ray work
        prepare_before_ray(cfg)  # builds absent models, checks the cousins' vocabularies
        run = open_run(cfg)  # an existing run id resumes; with a different config it is refused
    except (ConfigError, RunConflict) as e:
        sys.exit(f"error: {e}")
    if run.state == "committed":
        print(summary_table(result_from_manifest(run.layout)))
        print(drift_table(json.loads(run.layout.summary.read_text())))
        return
    init_ray(cfg.ray)
    try:
        build_students(cfg, run.layout.run_id)  # distilled cousins learn from a teacher-data run first
        check_vocabularies(cfg)
        result, summary = run_drift(cfg, run)
    except Exception as e:
        traceback.print_exc()  # the whole story for the log; the last line says what to do next
        sys.exit(f"error: run {run.layout.run_id} failed: {root_cause(e)}\n"
                 f"Nothing of it is committed; rerun with the same run.run_id={run.layout.run_id} to resume.")
    print(summary_table(result))
    print(drift_table(summary))
    t = summary["timings"]
    print(f"generate {t['generate_s']:.1f} s, score {t['score_s']:.1f} s, diff {t['diff_s']:.1f} s, "
          f"report {t['report_s']:.1f} s; report: {run.layout.report.url}")


if __name__ == "__main__":
    main()
