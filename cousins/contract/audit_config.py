"""The audit job's config (jobs/audit.py): the run config (`Config`: the reference is `model`, the
prompts `corpus`, the sampling `run`) plus the target `endpoint` and the `audit` block.

`as_run_config` turns it into the run an audit is: the reference, the target as a cousin named
TARGET behind its endpoint, and the noise floor (the reference against itself, the audit's A/A),
on at most `audit.budget // run.samples` prompts. `check` adds the audit's own problems to
validate's."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from cousins.contract.config import Config, CousinConfig, EndpointConfig, typed_endpoint

TARGET = "target"  # the audited endpoint's name in the run's outputs (generations/model=target/)


@dataclass
class AuditConfig:
    budget: int = 1000  # requests the target gets at most: prompts x run.samples (retries not counted)
    alpha: float = 0.05  # the family-wise level of the verdict (Holm's correction across the tests)
    permutations: int = 1000  # of each permutation test (its p-value is never below 1/(1+permutations))
    resamples: int = 1000  # prompts resampled for each effect's CI
    confidence: float = 0.95  # the level of those CIs
    # The MMD test compares each completion's first `compare_chars` characters (Hamming kernel).
    compare_chars: int = 64
    # The top-k test ignores a mean absolute log-probability difference below this (nats): what a
    # deterministic engine's numerics change under another batching is not another model.
    logprob_tolerance: float = 1e-3
    # The A/A calibration: the reference against itself (the noise floor: other seeds, other
    # batching) on this many disjoint groups of the prompts; the share whose verdict is `differs`
    # is the audit's measured false-positive rate.
    calibration_groups: int = 10
    seed: int = 0  # of the permutations and resamples
    # A trusted endpoint to sample the reference from instead of a local engine of `model` (an
    # endpoint block: {url: …, model: …}); `model.path` still names its tokenizer.
    reference_endpoint: Any = None


@dataclass
class AuditJobConfig(Config):
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)  # the audited server
    audit: AuditConfig = field(default_factory=AuditConfig)


ConfigStore.instance().store(name="base_audit", node=AuditJobConfig)


def typed_audit(cfg: AuditJobConfig, problems: list[str]) -> AuditJobConfig:
    """The reference endpoint's block typed (to_config types the run config's own)."""
    cfg.audit.reference_endpoint = typed_endpoint(cfg.audit.reference_endpoint, "audit.reference_endpoint", problems)
    return cfg


def problems(cfg: AuditJobConfig) -> list[str]:
    """The audit block's problems (validate reports the run config's, the target's endpoint included)."""
    a, samples = cfg.audit, cfg.run.samples
    checks = [
        (samples >= 2, f"run.samples must be >= 2 for an audit (each prompt's samples are compared as two sets), "
                       f"got {samples}"),
        (a.budget >= 2 * max(samples, 1), f"audit.budget {a.budget} is less than two prompts' requests "
                                          f"({samples} samples each)"),
        (0 < a.alpha < 1, f"audit.alpha must be in (0, 1), got {a.alpha}"),
        (a.permutations >= 99, f"audit.permutations must be >= 99, got {a.permutations}"),
        (a.resamples >= 10, f"audit.resamples must be >= 10, got {a.resamples}"),
        (0 < a.confidence < 1, f"audit.confidence must be in (0, 1), got {a.confidence}"),
        (a.compare_chars >= 1, f"audit.compare_chars must be >= 1, got {a.compare_chars}"),
        (a.logprob_tolerance >= 0, f"audit.logprob_tolerance must be >= 0, got {a.logprob_tolerance}"),
        (a.calibration_groups >= 1, f"audit.calibration_groups must be >= 1, got {a.calibration_groups}"),
        (cfg.run.sampling.temperature > 0, "run.sampling.temperature must be > 0 for an audit: greedy outputs are "
                                           "one sample, and the tests compare distributions"),
    ]
    out = [message for ok, message in checks if not ok]
    if cfg.cousins:
        out.append(f"cousins: an audit compares one endpoint with the reference; leave cousins empty "
                   f"(got {', '.join(cfg.cousins)})")
    return out


def as_run_config(cfg: AuditJobConfig) -> AuditJobConfig:
    """The run the audit is: the reference (model, or audit.reference_endpoint), the target as
    cousin TARGET (the reference's weights named for its tokenizer), the prompts cut to the budget."""
    out = copy.deepcopy(cfg)
    if cfg.audit.reference_endpoint is not None:
        out.model = dataclasses.replace(out.model, endpoint=cfg.audit.reference_endpoint)
    out.cousins = {TARGET: CousinConfig(kind="other", endpoint=cfg.endpoint)}
    per_budget = max(cfg.audit.budget // max(cfg.run.samples, 1), 1)
    out.corpus.limit = min(cfg.corpus.limit or per_budget, per_budget)
    return out
