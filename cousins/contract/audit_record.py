"""An audit run's `audit.json` (jobs/audit.py, cousins/audit/run.py), declared as typed records:
written through `codec.encode` and read back by `codec.decode` as every JSON file of a run is."""

from __future__ import annotations

from dataclasses import dataclass

from cousins.contract.codec import optional


@dataclass
class AuditTest:
    name: str  # mmd_hamming | topk_logprobs | mcnemar
    statistic: float | None  # None when not finite (nothing to compare)
    p_value: float | None
    reject: bool  # after Holm's correction across the tests of its verdict
    effect_ci: list[float | None] | None  # the statistic's CI, resampling prompts
    null_mean: float | None  # the statistic's mean over the permutations
    queries: int  # samples (requests) both sides gave it


@dataclass
class AuditCalibration:
    """The A/A: the same tests on the reference against its noise floor, on all prompts (verdict,
    tests) and on disjoint groups of them (the measured false-positive rate)."""

    verdict: str | None
    tests: list[AuditTest]
    groups: int  # groups with a test
    false_positives: int  # groups whose verdict is `differs`
    false_positive_rate: float | None
    ci: list[float] | None  # Wilson interval of the rate
    per_test: dict[str, dict[str, int]]  # test -> {groups, rejected} (each at alpha, uncorrected)


@dataclass
class AuditSide:
    name: str
    endpoint: str | None  # "URL (model NAME)", or None for a local engine
    path: str | None = optional()  # the reference's checkpoint (its tokenizer's, behind an endpoint)


@dataclass
class AuditSpent:
    requests: int  # the target's rows (retries not counted)
    error_rows: int
    prompt_tokens: int
    output_tokens: int


@dataclass
class Audit:
    run_id: str
    verdict: str  # consistent | differs
    alpha: float
    correction: str  # holm
    tests: list[AuditTest]
    a_a: AuditCalibration
    reference: AuditSide
    target: AuditSide
    prompts: int
    samples: int
    budget: int
    spent: AuditSpent
    notes: list[str]
