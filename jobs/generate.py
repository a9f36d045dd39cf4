"""Teacher generation: corpus -> prompts -> vLLM engine actors -> a committed Parquet run.

    python jobs/generate.py                                  # the demo: tiny teacher, demo corpus
    python jobs/generate.py run.samples=4 corpus.path=s3://bucket/prompts.jsonl
"""

import hydra
from omegaconf import DictConfig

from cousins.orchestrate.accounting import summary_table
from cousins.contract.config import resolve_paths
from cousins.orchestrate.jobkit import execute, start, typed
from cousins.orchestrate.pipeline import result_from_manifest, run_generate
from cousins.run.lifecycle import RunState


@hydra.main(version_base=None, config_path="../conf", config_name="generate")
def main(dcfg: DictConfig) -> None:
    cfg = resolve_paths(typed(dcfg))  # absolute paths now: working dirs can move under Ray jobs
    run = start(cfg)
    if run.state is RunState.COMMITTED:
        print(summary_table(result_from_manifest(run)))
        return
    print(summary_table(execute(cfg, run, lambda: run_generate(cfg, run))))


if __name__ == "__main__":
    main()
