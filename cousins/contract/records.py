"""The JSON half of the data contract: every JSON file a run holds, declared as typed records.

`schema.py` declares the Parquet tables; this module declares the rest of a run directory:
`manifest.json` (Manifest), `summary.json` (Summary) and each stage's `_SUCCESS` marker
(PromptsDone, GenerationsDone, ScoresDone, DriftDone, ExportDone). Writers build these records and
`encode` them; readers `decode` a file's JSON into its record, which names the first key that is
missing, unknown or of the wrong type ("manifest.row_counts.tiny-teacher.rows: expected int, got str").

A field declared with `optional()` is left out of the JSON while it is None, so files written
before it existed decode, and a record encodes back to exactly the JSON it was read from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

NOISE_FLOOR = "noise-floor"  # the pseudo-cousin: the original against itself under another batching
SEED_RULE = "sha256(f'{seed}:{prompt_id}:{sample_index}')[:4] little-endian & 0x7fffffff"


class RecordError(ValueError):
    """A JSON document that does not match its declared record."""


def optional(default: Any = None):
    """A field that may be absent from the JSON (and is omitted while None)."""
    return field(default=default, metadata={"omit_none": True})


# --- encode / decode -------------------------------------------------------------------------------

def encode(obj: Any) -> Any:
    """A record (or a container of records) as plain JSON data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = encode(value)
        return out
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy scalars
        return obj.item()
    return obj


def decode(cls: Any, data: Any, where: str = "") -> Any:
    """`data` (parsed JSON) as an instance of `cls`, checked all the way down."""
    where = where or getattr(cls, "__name__", "value").lower()
    return _decode(cls, data, where)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _decode(tp: Any, data: Any, where: str) -> Any:
    if tp is Any:
        return data
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _decode(arg, data, where)
            except RecordError as e:
                errors.append(str(e))
        raise RecordError(errors[0] if len(errors) == 1 else f"{where}: {data!r:.60} matches none of {args}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise RecordError(f"{where}: unknown keys {unknown}")
        hints, values = _hints(tp), {}
        for name, f in fields.items():
            if name in data:
                values[name] = _decode(hints[name], data[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}: missing key {name!r}")
        return tp(**values)
    if origin is list:
        if not isinstance(data, list):
            raise RecordError(f"{where}: expected a list, got {type(data).__name__}")
        (item,) = typing.get_args(tp)
        return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
        _, item = typing.get_args(tp)
        return {k: _decode(item, v, f"{where}.{k}") for k, v in data.items()}
    if tp is float:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return data  # JSON writes 1.0 as 1.0 but a whole float may come back as an int
        raise RecordError(f"{where}: expected a number, got {type(data).__name__}")
    if tp in (int, str, bool):
        if isinstance(data, tp) and not (tp is int and isinstance(data, bool)):
            return data
        raise RecordError(f"{where}: expected {tp.__name__}, got {type(data).__name__}")
    raise TypeError(f"{where}: cannot decode into {tp!r}")  # a declaration this module does not support


# --- stage markers (_SUCCESS) ----------------------------------------------------------------------

@dataclass
class PromptsDone:
    """prompts/ and errors/: rows written."""

    rows: int


@dataclass
class GenerationsDone:
    """generations/model=NAME/: what the attempt that finished the stage measured."""

    wall_s: float
    new_rows: int
    new_output_tokens: int
    retries: dict[str, Any]  # the engine ledger's report (engine starts, batches retried, windows)
    accelerator: str = "cpu-actor"  # "gpu" or "cpu-actor": what accelerator_s counts
    accelerator_s: float = 0.0


@dataclass
class ScoresDone:
    """scores/model=NAME/: the teacher-forced pass over the original's outputs."""

    rows: int
    error_rows: int
    engine_s: float
    wall_s: float
    batch_size: int
    reordered: bool
    retries: dict[str, Any] | None = optional()  # kept in the marker, left out of the manifest


@dataclass
class DriftDone:
    """drift/cousin=NAME/."""

    rows: int
    nodes: list[str] | None = optional()  # the Ray nodes that computed the rows


@dataclass
class ExportFile:
    name: str
    rows: int
    bytes: int


@dataclass
class ExportDone:
    """distill/{sft,kd}/ (or the export's `out`)."""

    rows: int
    files: list[ExportFile]


# --- the manifest ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelEntry:
    """One model of a run: the original, a cousin, or the noise-floor pass of the original."""

    name: str
    path: str
    dtype: str
    quantization: str | None
    kind: str  # original | quantized | distilled | other | noise
    text_only: bool = False
    reorder: bool = False  # the noise floor: other batch order and size than the original's pass
    revision: str | None = None  # a hub model's revision as configured
    lora: str | None = None  # a LoRA adapter served on top of `path`

    @property
    def is_original(self) -> bool:
        return self.kind == "original"


@dataclass
class ModelRecord:
    """A model as the manifest records it."""

    name: str
    kind: str
    path: str
    fingerprint: str | None
    dtype: str
    quantization: str | None
    text_only: bool
    reordered: bool
    revision: str | None = optional()
    lora: str | None = optional()


@dataclass
class CorpusRecord:
    path: str
    rows: int
    prompts: int
    error_rows: int


@dataclass
class SamplingRecord:
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    logprobs: int
    stop: list[str]


@dataclass
class ModelStats:
    """One model's generation stage: rows, tokens, time, and what they cost."""

    model: str
    prompts: int
    samples: int
    rows: int
    error_rows: int
    prompt_tokens: int
    output_tokens: int
    wall_s: float  # this attempt's stage wall time, engine start-up included
    engine_s: float  # summed engine busy time of all rows
    new_rows: int = 0  # rows generated by this attempt (the rest were there from an earlier one)
    new_output_tokens: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    retries: dict[str, Any] = field(default_factory=dict)  # engine starts, batches/rows retried
    # Accelerator-seconds held by this attempt's engines: stage wall time x actors x GPUs per actor
    # (x tensor-parallel size) on GPUs; x 1 per actor on CPU engines (actor-seconds).
    accelerator: str = "cpu-actor"  # "gpu" or "cpu-actor": what accelerator_s counts
    accelerator_s: float = 0.0
    price_per_accelerator_hour: float | None = None
    labelled_rows: int = 0  # rows whose prompt has a reference answer
    correct_rows: int = 0  # of those, rows whose answer contains the reference (normalised)
    labelled_output_tokens: int = 0
    tokens_per_s: float | None = optional()  # written by the manifest: new_output_tokens / wall_s
    labelled_prompts: int | None = optional()  # labelled prompts with an answered row (absent: older runs)
    accuracy_se: float | None = optional()  # of correct / labelled rows, clustered by prompt (plane.py)

    def __post_init__(self):
        self.tokens_per_s = self.new_output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_prompt(self) -> float | None:
        """Mean output tokens per generated row (token efficiency)."""
        ok = self.rows - self.error_rows
        return self.output_tokens / ok if ok else None

    @property
    def tokens_per_correct(self) -> float | None:
        """Output tokens spent on labelled prompts per correct answer among them."""
        return self.labelled_output_tokens / self.correct_rows if self.correct_rows else None

    @property
    def cost_per_1m_output_tokens(self) -> float | None:
        """This attempt's accelerator cost over the output tokens it generated, per million."""
        if self.price_per_accelerator_hour is None or not self.new_output_tokens:
            return None
        return self.price_per_accelerator_hour * self.accelerator_s / 3600 / self.new_output_tokens * 1e6

    def accounting(self) -> Accounting:
        return Accounting(
            accelerator=self.accelerator, accelerator_s=self.accelerator_s,
            price_per_accelerator_hour=self.price_per_accelerator_hour, prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens, tokens_per_s=self.tokens_per_s, engine_s=self.engine_s,
            tokens_per_prompt=self.tokens_per_prompt, labelled_rows=self.labelled_rows,
            correct_rows=self.correct_rows, tokens_per_correct=self.tokens_per_correct,
            cost_per_1m_output_tokens=self.cost_per_1m_output_tokens, labelled_prompts=self.labelled_prompts,
            accuracy_se=self.accuracy_se)


@dataclass
class Accounting:
    """A model's token accounting, in the manifest and the drift summary."""

    accelerator: str
    accelerator_s: float
    price_per_accelerator_hour: float | None
    prompt_tokens: int
    output_tokens: int
    tokens_per_s: float
    engine_s: float
    tokens_per_prompt: float | None
    labelled_rows: int
    correct_rows: int
    tokens_per_correct: float | None
    cost_per_1m_output_tokens: float | None
    labelled_prompts: int | None = optional()
    accuracy_se: float | None = optional()


@dataclass
class Headline:
    """A cousin's figures as a run listing shows them (the manifest's `drift`)."""

    kind: str
    error: str | None
    kld_mean: float | None
    same_top1: float | None
    flip_rate: float | None
    length_ratio: float | None
    exact_match: float | None


@dataclass
class Manifest:
    """manifest.json, written last: what ran, on what, and how many rows each stage holds."""

    run_id: str
    status: str  # "committed"
    committed: str  # ISO time
    resumed: bool
    config_hash: str
    versions: dict[str, str]
    models: list[ModelRecord]
    corpus: CorpusRecord
    sampling: SamplingRecord
    samples: int
    seed: int
    seed_rule: str
    stages: dict[str, str]  # stage directory -> "done"
    row_counts: dict[str, ModelStats]
    accounting: dict[str, Accounting]
    scores: dict[str, ScoresDone] | None = optional()  # drift runs
    drift: dict[str, Headline] | None = optional()  # drift runs
    drift_recomputed: str | None = optional()  # when the diff was last redone from stored rows


# --- the drift summary -----------------------------------------------------------------------------

@dataclass
class Metric:
    """A figure with its bootstrap interval over prompts (and a standard error where one is defined)."""

    value: float | None
    ci: list[float] | None
    se: float | None = optional()


@dataclass
class Slice:
    """A figure set over one slice of tokens (by the original's margin) or rows (by category)."""

    tokens: int | None = optional()
    rows: int | None = optional()
    kld_mean: Metric | None = optional()
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
    slices: dict[str, dict[str, Slice]]  # "margin" | "category" -> label -> figures


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
    quantile_error: str | None = optional()  # the stated error of the token quantiles (drift/summary.py)
    accounting: dict[str, Accounting] | None = optional()
    cost_currency: str | None = optional()
    timings: dict[str, float | None] | None = optional()
    plane: Plane | None = optional()
