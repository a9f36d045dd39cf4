"""Distillation data from a committed run: SFT chats (and with kd=true the teacher's per-token top-k
logprobs), filtered and deduplicated, sharded Parquet (or JSONL) with a dataset card.

    python jobs/export.py run_id=RUN                          # -> {run}/distill/sft/
    python jobs/export.py run_id=RUN kd=true filters.near_dedup=true filters.best_of_n=mean_logprob
    python jobs/export.py run_id=RUN format=jsonl out=s3://bucket/sft/
"""

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from cousins.export.card import filter_table
from cousins.export.config import ExportConfig, ExportError
from cousins.export.write import export


@hydra.main(version_base=None, config_path="../conf", config_name="export")
def main(dcfg: DictConfig) -> None:
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, ExportConfig)
    if "://" not in cfg.storage.root and not os.path.isabs(cfg.storage.root):
        cfg.storage.root = os.path.abspath(cfg.storage.root)
    try:
        result = export(cfg)
    except ExportError as e:
        sys.exit(f"error: {e}")
    print(filter_table(result))


if __name__ == "__main__":
    main()
