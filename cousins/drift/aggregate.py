"""Mergeable aggregates of drift rows: what a diff worker keeps of its partition's rows of one
cousin (`partial`), and what the driver merges them into (`Merged`) to make that cousin's summary
and report figures. No drift row reaches the driver, only:

- per-prompt sums (sums.SUMS: a few dozen numbers a prompt, made and kept on the worker): every
  ratio figure of the summary is Σ num / Σ den over prompts, so a partial carries their totals and
  their Poisson-resampled totals (resample.Sums: B x columns, whatever the partition's size), the
  same for a few columns per category, the rank-correlation histogram of options' KL and flips, and
  the homogenisation's candidate prompts (resample.py);
- token KLD histograms on a fine log grid (sketch.KLD_GRID) for the quantiles and the report's
  plot, plus Poisson-resampled ones (sketch.KLD_BOOT_GRID) for the quantiles' CIs; a token Δp
  histogram on a linear grid (sketch.DP_GRID); the extremes (KLD min/max, reverse KLD and tail
  mass max, Δp min/max), which merge by min/max;
- per-prompt sums of squares and cross products of the tokens' logprobs (sums.ROW_SUMS nll_*): the
  Pearson correlation of log p(y_t) and log q(y_t) (llama.cpp's Cor(ln PPL(Q), ln PPL(base))) and
  the standard error of mean ln(PPL_c/PPL_o) are functions of these sums;
- a histogram of per-row length ratios (the report's box plot) and the partition's worst rows
  (a top-N that merges into the run's top-N).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cousins.contract import schema
from cousins.drift.spans import col as _col, flat as _flat
from cousins.drift.resample import (CATEGORY_RESAMPLES, CATEGORY_SUMS, Sums, merge_counts, merge_smallest,
                                     poisson_weights, smallest, spearman_counts)
from cousins.drift.sketch import DP_GRID, KLD_BOOT_GRID, KLD_GRID, LENGTH_GRID, weighted_counts
from cousins.drift.sums import FIGURE_SUMS, prompt_sums

# The report's worst rows: the drift row without its per-token lists.
WORST = pa.schema([f for f in schema.DRIFT if not pa.types.is_list(f.type)])


def worst_order(text_only: bool) -> list[tuple[str, str]]:
    """Worst first: highest KLD mean, or lowest chrF for a text-only cousin; nulls last (Arrow's
    default), ties broken by row key so the choice is deterministic."""
    key = ("chrf", "ascending") if text_only else ("kld_mean", "descending")
    return [key, ("prompt_id", "ascending"), ("sample_index", "ascending")]


def top_rows(rows: pa.Table, text_only: bool, n: int) -> pa.Table:
    if n <= 0 or rows.num_rows == 0:
        return WORST.empty_table()
    rows = rows.select(WORST.names)
    return rows.take(pc.sort_indices(rows, sort_keys=worst_order(text_only))[:n])


# The extremes a partial carries, and how two of them merge.
EXTREMES = {"kld_max": max, "kld_min": min, "rkld_max": max, "tail_max": max, "dp_min": min, "dp_max": max}


@dataclass(kw_only=True)
class Extremes:
    """The extremes (EXTREMES, one field each) that a Partial carries and a Merged keeps; None where
    no token had one. Keyword-only, so they follow the subclasses' own fields."""

    kld_max: float | None = None
    kld_min: float | None = None
    rkld_max: float | None = None
    tail_max: float | None = None
    dp_min: float | None = None
    dp_max: float | None = None


@dataclass
class Partial(Extremes):
    """One worker's aggregate of one cousin's drift rows (see the module's note)."""

    cousin: str
    rows: int
    error_rows: int
    sums: Sums
    worst: pa.Table
    length: np.ndarray
    length_sum: float
    length_n: int
    kld: np.ndarray | None = None
    kld_boot: np.ndarray | None = None
    node: str = ""
    dp: np.ndarray | None = None
    cats: dict = field(default_factory=dict)  # category -> Sums of CATEGORY_SUMS
    spear: np.ndarray | None = None  # resample.spearman_counts
    pairs: list = field(default_factory=list)  # resample.smallest of prompts with a sample 0


def _extreme(values: np.ndarray, pick) -> float | None:
    values = values[np.isfinite(values)]
    return float(pick(values)) if len(values) else None


def partial(cousin: str, rows: pa.Table, *, token_level: bool, worst_n: int, seed: int, resamples: int,
            quantile_resamples: int, node: str = "") -> Partial:
    """The aggregate of `rows` (schema.DRIFT, one cousin, whole prompts: every row of a prompt in
    the same worker). Ratio figures' CIs draw `resamples` Poisson weights per prompt, quantiles'
    the first `quantile_resamples` of them."""
    ok = rows.filter(pc.is_null(rows.column("error")))
    sums = prompt_sums(ok, token_level)
    ids = sums.column("prompt_id").to_pylist()
    weights = poisson_weights(ids, max(resamples, quantile_resamples), seed)
    values = np.column_stack([sums.column(c).to_numpy() for c in FIGURE_SUMS]) if ids else \
        np.zeros((0, len(FIGURE_SUMS)))
    ratio = _col(ok, "length_ratio")
    ratio = ratio[np.isfinite(ratio)]
    p = Partial(cousin=cousin, rows=rows.num_rows, error_rows=rows.num_rows - ok.num_rows,
                sums=Sums.of(FIGURE_SUMS, values, weights[:resamples]),
                worst=top_rows(ok, not token_level, worst_n), length=LENGTH_GRID.counts(ratio),
                length_sum=float(ratio.sum()), length_n=int(len(ratio)), node=node)
    cats = np.asarray(["(none)" if c is None else c for c in sums.column("category").to_pylist()], dtype=object)
    at = [FIGURE_SUMS.index(c) for c in CATEGORY_SUMS]
    small = weights[:min(resamples, CATEGORY_RESAMPLES)]
    p.cats = {cat: Sums.of(CATEGORY_SUMS, values[cats == cat][:, at], small[:, cats == cat])
              for cat in sorted(set(cats.tolist()))}
    c = {k: values[:, FIGURE_SUMS.index(k)] for k in ("opt_n", "opt_kl", "mc_n", "mc_flip", "has0")}
    both = (c["opt_n"] > 0) & (c["mc_n"] > 0)  # a prompt's mean option KL against its flip rate
    p.spear = spearman_counts(c["opt_kl"][both] / c["opt_n"][both], c["mc_flip"][both] / c["mc_n"][both])
    p.pairs = smallest([i for i, h in zip(ids, c["has0"]) if h > 0], seed)
    if token_level:
        kld, row = _flat(ok, "kld_tokens")
        p.kld = KLD_GRID.counts(kld)
        p.kld_max, p.kld_min = _extreme(kld, np.max), _extreme(kld, np.min)
        dp = _flat(ok, "dp_tokens")[0]
        p.dp, p.dp_min, p.dp_max = DP_GRID.counts(dp), _extreme(dp, np.min), _extreme(dp, np.max)
        p.rkld_max = _extreme(_flat(ok, "rkld_tokens")[0], np.max)
        p.tail_max = _extreme(_flat(ok, "tail_mass_tokens")[0], np.max)
        if quantile_resamples > 0:
            pids = ok.column("prompt_id").to_pylist()
            at = np.searchsorted(np.asarray(ids, dtype=object), np.asarray(pids, dtype=object))[row]
            p.kld_boot = weighted_counts(KLD_BOOT_GRID, kld, at, weights[:quantile_resamples])
    return p


# --- partials through Ray Data: one row per (partition, cousin) ----------------------------------

PARTIALS = pa.schema([("cousin", pa.string()), ("node", pa.string()), ("rows", pa.int64()),
                      ("error_rows", pa.int64()), ("length_sum", pa.float64()), ("length_n", pa.int64()),
                      *[(k, pa.float64()) for k in EXTREMES], ("sums", pa.binary()), ("worst", pa.binary()),
                      ("length", pa.binary()), ("kld", pa.binary()), ("kld_boot", pa.binary()), ("dp", pa.binary()),
                      ("spear", pa.binary()), ("pairs", pa.binary())])
# A partial's resampled sums: the figures' (category null), then each category's.
_SUMS = pa.schema([("category", pa.string()), ("prompts", pa.int64()), ("total", pa.binary()), ("boot", pa.binary())])
_PAIRS = pa.schema([("hash", pa.uint64()), ("prompt_id", pa.string())])


# Partials are compressed (zstd): they pass through the object store into the driver, whose
# memory would otherwise grow with the bytes streamed through it. Resampled histograms are mostly
# zeros and small integers: 200 x 282 float64 (440 KiB) become about 20 KiB.

def _ipc(t: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, t.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(t)
    return sink.getvalue()


def _table(b: bytes) -> pa.Table:
    return pa.ipc.open_stream(b).read_all()


def _arr(a: np.ndarray | None) -> bytes | None:
    if a is None:
        return None
    raw = np.ascontiguousarray(a, dtype=np.float64).tobytes()
    return len(raw).to_bytes(8, "little") + pa.compress(raw, codec="zstd", asbytes=True)


def _unarr(b: bytes | None) -> np.ndarray | None:
    if b is None:
        return None
    n = int.from_bytes(b[:8], "little")
    return np.frombuffer(pa.decompress(b[8:], decompressed_size=n, codec="zstd", asbytes=True), dtype=np.float64)


def _sums(p: Partial) -> bytes:
    items = [(None, p.sums), *p.cats.items()]
    return _ipc(pa.table({"category": [k for k, _ in items], "prompts": [v.prompts for _, v in items],
                          "total": [_arr(v.total) for _, v in items], "boot": [_arr(v.boot) for _, v in items]},
                         schema=_SUMS))


def _unsums(b: bytes) -> tuple[Sums, dict[str, Sums]]:
    main, cats = None, {}
    for r in _table(b).to_pylist():
        names = FIGURE_SUMS if r["category"] is None else CATEGORY_SUMS
        s = Sums(names, _unarr(r["total"]), _unarr(r["boot"]).reshape(-1, len(names)), r["prompts"])
        if r["category"] is None:
            main = s
        else:
            cats[r["category"]] = s
    return main, cats


def to_rows(parts: list[Partial]) -> pa.Table:
    cols = {
        "cousin": [p.cousin for p in parts], "node": [p.node for p in parts], "rows": [p.rows for p in parts],
        "error_rows": [p.error_rows for p in parts], "length_sum": [p.length_sum for p in parts],
        "length_n": [p.length_n for p in parts], **{k: [getattr(p, k) for p in parts] for k in EXTREMES},
        "sums": [_sums(p) for p in parts], "worst": [_ipc(p.worst) for p in parts],
        "length": [_arr(p.length) for p in parts], "kld": [_arr(p.kld) for p in parts],
        "kld_boot": [_arr(p.kld_boot) for p in parts], "dp": [_arr(p.dp) for p in parts],
        "spear": [_arr(p.spear) for p in parts],
        "pairs": [_ipc(pa.table({"hash": [h for h, _ in p.pairs], "prompt_id": [i for _, i in p.pairs]}, schema=_PAIRS))
                  for p in parts],
    }
    return pa.table(cols, schema=PARTIALS)


def from_rows(batch: pa.Table) -> list[Partial]:
    out = []
    for r in batch.to_pylist():
        boot, spear = _unarr(r["kld_boot"]), _unarr(r["spear"])
        sums, cats = _unsums(r["sums"])
        pairs = _table(r["pairs"])
        out.append(Partial(cousin=r["cousin"], rows=r["rows"], error_rows=r["error_rows"], sums=sums, cats=cats,
                           worst=_table(r["worst"]), length=_unarr(r["length"]), length_sum=r["length_sum"],
                           length_n=r["length_n"], kld=_unarr(r["kld"]),
                           kld_boot=None if boot is None else boot.reshape(-1, KLD_BOOT_GRID.buckets),
                           node=r["node"], dp=_unarr(r["dp"]), **{k: r[k] for k in EXTREMES},
                           spear=None if spear is None else spear.reshape(-1, 3),
                           pairs=list(zip(pairs.column("hash").to_pylist(), pairs.column("prompt_id").to_pylist()))))
    return out


# --- the driver's side ------------------------------------------------------------------------------

@dataclass
class Merged(Extremes):
    """Every partial of one cousin, merged as they arrive: histograms and resampled sums add,
    top-N rows re-rank, the homogenisation's candidates keep the smallest hashes. What it holds does
    not grow with the run: B x figures sums, B' x a few per category, fixed-size histograms."""

    cousin: str
    text_only: bool
    worst_n: int
    rows: int = 0
    error_rows: int = 0
    nodes: set = field(default_factory=set)
    worst: pa.Table = field(default_factory=lambda: WORST.empty_table())
    length: np.ndarray = field(default_factory=lambda: np.zeros(LENGTH_GRID.buckets))
    length_sum: float = 0.0
    length_n: int = 0
    kld: np.ndarray | None = None
    kld_boot: np.ndarray | None = None
    dp: np.ndarray | None = None
    sums: Sums | None = None
    cats: dict = field(default_factory=dict)
    spear: np.ndarray | None = None
    pairs: list = field(default_factory=list)

    def add(self, p: Partial) -> None:
        self.rows += p.rows
        self.error_rows += p.error_rows
        if p.node:
            self.nodes.add(p.node)
        self.sums = p.sums if self.sums is None else self.sums.add(p.sums)
        for cat, c in p.cats.items():
            self.cats[cat] = self.cats[cat].add(c) if cat in self.cats else c
        self.spear = merge_counts(self.spear, p.spear)
        self.pairs = merge_smallest(self.pairs, p.pairs)
        self.worst = top_rows(pa.concat_tables([self.worst, p.worst]), self.text_only, self.worst_n)
        self.length = self.length + p.length
        self.length_sum += p.length_sum
        self.length_n += p.length_n
        if p.kld is not None:
            self.kld = p.kld.copy() if self.kld is None else self.kld + p.kld
        if p.kld_boot is not None:
            self.kld_boot = p.kld_boot.copy() if self.kld_boot is None else self.kld_boot + p.kld_boot
        if p.dp is not None:
            self.dp = p.dp.copy() if self.dp is None else self.dp + p.dp
        for k, pick in EXTREMES.items():
            if getattr(p, k) is not None:
                setattr(self, k, getattr(p, k) if getattr(self, k) is None else pick(getattr(self, k), getattr(p, k)))

    @property
    def prompts(self) -> int:
        return self.sums.prompts if self.sums is not None else 0

    def pair_prompts(self) -> list[str]:
        """The prompts (with a sample 0) the homogenisation pairs are drawn among, in prompt id
        order: every such prompt up to resample.HOMOGENISATION_PROMPTS, else that many by hash."""
        return sorted(i for _, i in self.pairs)

    def view(self) -> "ReportView":
        tokens, kld = (self.sums["T"].total, self.sums["kld"].total) if self.sums is not None else (0.0, 0.0)
        return ReportView(text_only=self.text_only, kld=self.kld,
                          kld_mean=kld / tokens if tokens else None, length=self.length,
                          length_mean=self.length_sum / self.length_n if self.length_n else None,
                          worst=self.worst)


@dataclass(frozen=True)
class ReportView:
    """What the report draws of one cousin: its token KLD histogram (sketch.KLD_GRID) and mean,
    its length-ratio histogram (sketch.LENGTH_GRID) and mean, and its worst rows, worst first."""

    text_only: bool
    kld: np.ndarray | None
    kld_mean: float | None
    length: np.ndarray
    length_mean: float | None
    worst: pa.Table


class Accumulator:
    """The merge as a Ray actor: the diff's tasks' PARTIALS batches are handed to it by reference
    and merged here, so their bytes never pass through the driver (whose memory would otherwise
    map every object store page they landed on). `add` returns the batch's (rows, error rows)
    for the progress bar; `result` the merged state, once."""

    def __init__(self, cousins: dict[str, bool], worst_n: int):
        self.merged = {name: Merged(name, text_only, worst_n) for name, text_only in cousins.items()}

    def add(self, batch: pa.Table) -> tuple[int, int]:
        for p in from_rows(batch):
            self.merged[p.cousin].add(p)
        return (pc.sum(batch.column("rows")).as_py() or 0), (pc.sum(batch.column("error_rows")).as_py() or 0)

    def result(self) -> dict[str, Merged]:
        return self.merged


def merge_all(batches, cousins: dict[str, bool], worst_n: int) -> dict[str, Merged]:
    """Merge a stream of PARTIALS batches; `cousins`: name -> text only."""
    merged = {name: Merged(name, text_only, worst_n) for name, text_only in cousins.items()}
    for batch in batches:
        for p in from_rows(batch):
            merged[p.cousin].add(p)
    return merged


def merge_table(drift: pa.Table, *, text_only: set[str] = frozenset(), worst_n: int = 10, seed: int = 0,
                resamples: int = 1000, quantile_resamples: int = 200) -> dict[str, Merged]:
    """Every cousin of an in-memory drift table as one partial each (tests and small tables)."""
    names = list(dict.fromkeys(drift.column("cousin").to_pylist()))
    parts = [partial(n, drift.filter(pc.equal(drift.column("cousin"), n)), token_level=n not in text_only,
                     worst_n=worst_n, seed=seed, resamples=resamples, quantile_resamples=quantile_resamples)
             for n in names]
    return merge_all([to_rows(parts)], {n: n in text_only for n in names}, worst_n)
