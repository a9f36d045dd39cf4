"""Teacher generation: corpus -> prompts -> vLLM engine actors -> a committed Parquet run.

    python jobs/generate.py                                  # the demo: tiny teacher, demo corpus
    python jobs/generate.py run.samples=4 corpus.path=s3://bucket/prompts.jsonl
"""

import sys

import hydra
from omegaconf import DictConfig

from cousins.config import ConfigError, resolve_paths, to_config, validate
from cousins.models import ensure_model
from cousins.pipeline import run_generate, summary_table
from cousins.runtime import init_ray


@hydra.main(version_base=None, config_path="../conf", config_name="generate")
def main(dcfg: DictConfig) -> None:
    cfg = resolve_paths(to_config(dcfg))  # absolute paths now: working dirs can move under Ray jobs
    try:
        validate(cfg)  # every config error at once, before any Ray work
    except ConfigError as e:
        sys.exit(f"error: {e}")
    ensure_model(cfg.model.path, cfg.model.build, cfg.model.seed)  # builds the tiny teacher if absent
    init_ray(cfg.ray)
    result = run_generate(cfg)
    print(summary_table(result))


if __name__ == "__main__":
    main()
