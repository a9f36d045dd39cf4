"""What a distillation export is asked and what it answers: its settings (`ExportConfig` with its
`FiltersConfig`, registered with Hydra as `base_export` when this module is imported: the defaults
conf/export.yaml composes), `ExportError` for bad input, the schemas of the rows it writes (`SFT`
chats, and `KD`: SFT plus the teacher's per-token top-k logprobs), and the records of a finished
export (a `FilterReport` per filter that ran, the `ExportResult`). Nothing here reads or writes
data: the filters are `cousins.export.filters`, the export itself `cousins.export.write` and its
dataset card `cousins.export.card`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
from omegaconf import MISSING

from cousins.contract import schema
from cousins.contract.config import LogConfig, RayConfig, StorageConfig

# --- config --------------------------------------------------------------------------------------


@dataclass
class FiltersConfig:
    drop_truncated: bool = True  # drop outputs cut by max_tokens (finish reason "length")
    min_output_tokens: int = 1  # drop shorter outputs
    max_output_tokens: int | None = None  # drop longer outputs (None: no limit)
    # None, or an answer checker (cousins/drift/answers.py: contains, exact, auto, math, last_number, boxed,
    # gsm8k-strict, gsm8k-flexible, regex): labelled prompts' final answers must be right
    answer_check: str | None = None
    answer_regex: str | None = None  # answer_check=regex: group 1 (or the match) must equal the reference, normalised
    exact_dedup: bool = True  # identical (prompt, answer) pairs, whitespace- and case-normalised
    near_dedup: bool = False  # MinHash LSH near-duplicate answers to the same prompt kind
    near_dedup_threshold: float = 0.8  # estimated Jaccard similarity of word 3-gram sets
    near_dedup_num_perm: int = 128  # MinHash permutations
    best_of_n: str | None = None  # keep one row per prompt: the max of this field ("-field": the min)


@dataclass
class ExportConfig:
    run_id: str = MISSING  # the committed run to export
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)  # the filters and joins run on Ray Data
    log: LogConfig = field(default_factory=LogConfig)
    model: str | None = None  # default: the run's original model
    kd: bool = False  # add the teacher's per-token top-k logprobs (logit distillation)
    format: str = "parquet"  # parquet | jsonl
    rows_per_file: int = 50_000  # at most; a file holds one partition's rows (about 20k SFT or 2k KD rows)
    out: str | None = None  # default: {run}/distill/{sft|kd}
    filters: FiltersConfig = field(default_factory=FiltersConfig)


class ExportError(ValueError):
    pass


# --- schema of the export ------------------------------------------------------------------------

SFT = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("messages", pa.list_(schema.MESSAGE), nullable=False),  # system?/user/…/assistant
    pa.field("category", pa.string()),
    pa.field("reference", pa.string()),
    pa.field("teacher", pa.string(), nullable=False),
    pa.field("prompt_text", pa.string()),  # the prompt after the teacher's chat template
    pa.field("finish_reason", pa.string()),
    pa.field("output_tokens", pa.int32()),
])
KD = pa.schema([
    *SFT,
    pa.field("token_ids", pa.list_(pa.int32())),  # the assistant tokens, in the teacher's vocabulary
    pa.field("topk_token_ids", pa.list_(pa.list_(pa.int32()))),  # per assistant token, the teacher's top-k
    pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
])


# --- what an export answers ----------------------------------------------------------------------

@dataclass
class FilterReport:
    name: str
    before: int
    dropped: int
    detail: str = ""


@dataclass
class ExportResult:
    out_url: str
    files: list[dict]  # name, rows, bytes
    rows_in: int
    rows_out: int
    filters: list[FilterReport]
    output_tokens: int
    bytes_per_output_token: float | None
    topk: int | None


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_export", node=ExportConfig)


register()
