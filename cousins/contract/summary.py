"""The records of summary.json: a drift run's figures, declared as typed records.

Summary holds every cousin's figures (CousinSummary: Metric values with bootstrap intervals, and
Slice figure sets by the original's margin and by category), the noise floor's, the bootstrap's
settings (BootstrapRecord), the per-model token accounting (records.Accounting, shared with the
manifest) and the capability-against-cost plane (Plane, PlanePoint, Dominance). They are written and
read through `codec.encode` and `codec.decode`, as the manifest and the stage markers (records.py) are.
"""

from __future__ import annotations

from dataclasses import dataclass

from cousins.contract.codec import optional
from cousins.contract.records import Accounting


@dataclass
class Metric:
    """A figure with its bootstrap interval over prompts (and a standard error where one is defined)."""

    value: float | None
    ci: list[float] | None
    se: float | None = optional()
    p: float | None = optional()  # a test's p-value (a rank correlation's)
    prompts: int | None = optional()  # the prompts a correlation is over


@dataclass
class Slice:
    """A figure set over one slice of tokens (by the original's margin) or rows (by category)."""

    tokens: int | None = optional()
    rows: int | None = optional()
    prompts: int | None = optional()
    kld_mean: Metric | None = optional()
    option_kl: Metric | None = optional()
    same_top1: Metric | None = optional()
    flip_rate: Metric | None = optional()
    length_ratio: Metric | None = optional()


@dataclass
class CousinSummary:
    name: str
    kind: str
    text_only: bool
    rows: int
    tokens: int
    error_rows: int
    error: str | None
    metrics: dict[str, Metric]
    slices: dict[str, dict[str, Slice]]  # "margin" | "category" | "option_margin" -> label -> figures


@dataclass
class BootstrapRecord:
    resamples: int
    level: float
    seed: int
    quantile_resamples: int


@dataclass
class Dominance:
    """Another model at least as good on every axis of the plane and strictly better on one."""

    model: str
    within_ci: bool  # the intervals leave room for the dominated model to be the better one


@dataclass
class PlanePoint:
    """One model on the capability-against-cost plane (cousins/drift/plane.py)."""

    name: str
    kind: str
    labelled_rows: int
    labelled_prompts: int | None
    correct_rows: int
    accuracy: Metric  # correct / labelled rows, Wilson interval over the prompt-clustered effective n
    tokens_per_correct: Metric  # output tokens on labelled prompts per correct answer
    cost_per_1m_output_tokens: float | None
    frontier: bool | None  # None: not placed (the noise floor, or no labelled rows)
    dominated_by: list[Dominance]
    interval_basis: str | None = optional()  # "prompts" (clustered) or "rows" (older runs)


@dataclass
class Plane:
    """Every model's accuracy against tokens per correct answer and cost, the frontier marked."""

    axes: list[str]  # what the frontier is decided on (cost only when every placed model has one)
    level: float
    interval: str
    currency: str
    models: list[PlanePoint]
    notes: list[str]


@dataclass
class Summary:
    """summary.json of a drift run: every cousin's figures with CIs, and the noise floor."""

    run_id: str
    original: str
    score_topk: int
    prompts: int
    bootstrap: BootstrapRecord
    kld_bound: str
    answer_match: str
    noise_floor: CousinSummary | None
    cousins: list[CousinSummary]
    computed: str
    warnings: list[str] | None = optional()  # e.g. a top-k KLD that understates the full KLD
    kld: str | None = optional()  # topk (a lower bound) or exact (drift.kld)
    # exact: each compared model's route, "hidden" (final hidden states, our heads) or "lists: WHY"
    kld_routes: dict[str, str] | None = optional()
    quantile_error: str | None = optional()  # the stated error of the token quantiles (drift/summary.py)
    accounting: dict[str, Accounting] | None = optional()
    cost_currency: str | None = optional()
    timings: dict[str, float | None] | None = optional()
    plane: Plane | None = optional()
    # labelled prompts by the checker that judges them (drift.answer_match=auto picks per reference)
    answer_checkers: dict[str, int] | None = optional()
