"""Teacher generation: corpus -> prompts -> vLLM engine actors -> a committed Parquet run.

    python jobs/generate.py                                  # the demo: tiny teacher, demo corpus
    python jobs/generate.py run.samples=4 corpus.path=s3://bucket/prompts.jsonl
"""

import sys
import traceback

import hydra
from omegaconf import DictConfig

from cousins.config import ConfigError, resolve_paths, to_config, validate
from cousins.family import build_students, prepare_before_ray
from cousins.pipeline import RunConflict, open_run, result_from_manifest, run_generate, summary_table
from cousins.runtime import init_ray, root_cause


@hydra.main(version_base=None, config_path="../conf", config_name="generate")
def main(dcfg: DictConfig) -> None:
    cfg = resolve_paths(to_config(dcfg))  # absolute paths now: working dirs can move under Ray jobs
    try:
        validate(cfg)  # every config error at once, before any Ray work
        prepare_before_ray(cfg)  # builds absent models (the tiny teacher, quantized cousins)
        run = open_run(cfg)  # an existing run id resumes; with a different config it is refused
    except (ConfigError, RunConflict) as e:
        sys.exit(f"error: {e}")
    if run.state == "committed":
        print(summary_table(result_from_manifest(run.layout)))
        return
    init_ray(cfg.ray)
    try:
        build_students(cfg, run.layout.run_id)  # distilled cousins, if any, learn from teacher data first
        result = run_generate(cfg, run)
    except Exception as e:
        traceback.print_exc()  # the whole story for the log; the last line says what to do next
        sys.exit(f"error: run {run.layout.run_id} failed: {root_cause(e)}\n"
                 f"Nothing of it is committed; rerun with the same run.run_id={run.layout.run_id} to resume.")
    print(summary_table(result))


if __name__ == "__main__":
    main()
