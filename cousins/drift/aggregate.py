"""Mergeable aggregates of drift rows: what a diff worker keeps of its partition's rows of one
cousin (`partial`), and what the driver merges them into (`Merged`) to make that cousin's summary
and report figures. No drift row reaches the driver, only:

- per-prompt sums (`SUMS`: a few dozen numbers a prompt): every ratio figure of the summary is
  Σ num / Σ den over prompts, so the bootstrap over prompts (summary.Bootstrap) needs nothing else
  and gives the same figures and CIs as resampling the rows themselves;
- token KLD histograms on a fine log grid (sketch.KLD_GRID) for the quantiles and the report's
  plot, plus Poisson-resampled ones (sketch.KLD_BOOT_GRID) for the quantiles' CIs; a token Δp
  histogram on a linear grid (sketch.DP_GRID); the extremes (KLD min/max, reverse KLD and tail
  mass max, Δp min/max), which merge by min/max;
- per-prompt sums of squares and cross products of the tokens' logprobs (ROW_SUMS nll_*): the
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
from cousins.drift import metrics
from cousins.drift.options import MARGIN_BINS, OPTION_SUMS, margin_bins, option_sums
from cousins.drift.spans import SPAN_SUMS, col as _col, flat as _flat, span_token_sums, thinking_sums
from cousins.drift.sketch import DP_GRID, KLD_BOOT_GRID, KLD_GRID, LENGTH_GRID, poisson_weights, weighted_counts

TOKEN_SUMS = ["T", "kld", "kld2", "same", "dp", "dp2", "rest", "rkld", "rkld2", "rkld_n", "tail", "tail_n", *SPAN_SUMS,
              *[f"m{i}_{k}" for i in range(len(MARGIN_BINS) - 1) for k in ("n", "kld", "same")]]
ROW_SUMS = ["n", "tokens", "nll_o", "nll_c", "nll_d", "nll_o2", "nll_c2", "nll_oc", "exact", "fd", "fd_n", "chrf", "rouge", "ctok", "otok",
            "finish", "co", "cc", "labelled", "flip", "flip_cw", "flip_wc", "has0",
            "think", "th_o", "th_c", "unf_o", "unf_c", "ans_o", "ans_c", "unp_o", "unp_c",
            *[f"d{n}_{side}{x}" for side in ("o", "c") for n in (1, 2) for x in ("", "_n")], *OPTION_SUMS]
SUMS = pa.schema([("prompt_id", pa.string()), ("category", pa.string()),
                  *[(c, pa.float64()) for c in ROW_SUMS + TOKEN_SUMS]])
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


def prompt_sums(ok: pa.Table, token_level: bool) -> pa.Table:
    """Per-prompt sums (SUMS) of one cousin's drift rows without an error, sorted by prompt id."""
    if ok.num_rows == 0:
        return SUMS.empty_table()
    pids = np.asarray(ok.column("prompt_id").to_pylist(), dtype=object)
    uniq, inv = np.unique(pids, return_inverse=True)
    inv = inv.reshape(-1)
    P = len(uniq)

    def per_prompt(values: np.ndarray, where: np.ndarray = inv) -> np.ndarray:
        return np.bincount(where, weights=values, minlength=P)

    out = {c: np.zeros(P) for c in ROW_SUMS + TOKEN_SUMS}
    ones = np.ones(ok.num_rows)
    tokens, nll_o, nll_c = _col(ok, "tokens"), _col(ok, "nll_original"), _col(ok, "nll_cousin")
    fd = _col(ok, "first_divergence")
    co, cc = _col(ok, "correct_original"), _col(ok, "correct_cousin")
    out.update(n=per_prompt(ones), exact=per_prompt(_col(ok, "exact_match")),
               fd=per_prompt(np.nan_to_num(fd)), fd_n=per_prompt((~np.isnan(fd)).astype(float)),
               chrf=per_prompt(_col(ok, "chrf")), rouge=per_prompt(_col(ok, "rouge_l")),
               ctok=per_prompt(_col(ok, "cousin_tokens")), otok=per_prompt(_col(ok, "original_tokens")),
               finish=per_prompt(_col(ok, "finish_changed")), labelled=per_prompt((~np.isnan(co)).astype(float)),
               co=per_prompt(np.nan_to_num(co)), cc=per_prompt(np.nan_to_num(cc)),
               flip=per_prompt(np.nan_to_num(_col(ok, "flip"))),
               # the flips' two directions: correct -> wrong (what a cousin lost), wrong -> correct
               flip_cw=per_prompt(np.nan_to_num(co * (1 - cc))), flip_wc=per_prompt(np.nan_to_num((1 - co) * cc)),
               **thinking_sums(ok, per_prompt), **option_sums(ok, per_prompt, _col),
               unp_o=per_prompt(np.nan_to_num(_col(ok, "unparsed_original"))),
               unp_c=per_prompt(np.nan_to_num(_col(ok, "unparsed_cousin"))),
               has0=np.minimum(per_prompt((ok.column("sample_index").to_numpy() == 0).astype(float)), 1.0))
    for side, column in (("o", "original_text"), ("c", "cousin_text")):
        texts = [t or "" for t in ok.column(column).to_pylist()]
        for n in (1, 2):
            d = np.asarray([np.nan if (x := metrics.distinct_n(t, n)) is None else x for t in texts])
            out[f"d{n}_{side}"] = per_prompt(np.nan_to_num(d))
            out[f"d{n}_{side}_n"] = per_prompt((~np.isnan(d)).astype(float))
    if token_level:
        out.update(tokens=per_prompt(tokens), nll_o=per_prompt(nll_o), nll_c=per_prompt(nll_c),
                   nll_d=per_prompt(nll_c - nll_o), nll_o2=per_prompt(_col(ok, "nll_original_sq")),
                   nll_c2=per_prompt(_col(ok, "nll_cousin_sq")), nll_oc=per_prompt(_col(ok, "nll_cross")))
        # Exact mode only (null lists otherwise); a reverse KLD is null where it is infinite.
        for name, column in (("rkld", "rkld_tokens"), ("tail", "tail_mass_tokens")):
            v, r = _flat(ok, column)
            has = np.isfinite(v)
            out[name] = per_prompt(np.where(has, v, 0.0), inv[r])
            out[f"{name}_n"] = per_prompt(has.astype(float), inv[r])
            if name == "rkld":
                out["rkld2"] = per_prompt(np.where(has, v * v, 0.0), inv[r])
        kld, row = _flat(ok, "kld_tokens")
        at = inv[row]
        same, _ = _flat(ok, "same_top1_tokens")
        dp, _ = _flat(ok, "dp_tokens")
        margin, _ = _flat(ok, "margin_tokens")
        out.update(T=per_prompt(np.ones_like(kld), at), kld=per_prompt(kld, at), kld2=per_prompt(kld * kld, at),
                   same=per_prompt(same, at), dp=per_prompt(dp, at), dp2=per_prompt(dp * dp, at),
                   rest=per_prompt(_flat(ok, "rest_mass_tokens")[0], at),
                   **span_token_sums(ok, kld, same, row, lambda v: per_prompt(v, at)))
        for i, sel in enumerate(margin_bins(margin)):
            out[f"m{i}_n"] = per_prompt(sel.astype(float), at)
            out[f"m{i}_kld"] = per_prompt(np.where(sel, kld, 0.0), at)
            out[f"m{i}_same"] = per_prompt(np.where(sel, same, 0.0), at)
    first = np.unique(inv, return_index=True)[1]
    cols = {"prompt_id": pa.array(uniq.tolist(), pa.string()),
            "category": ok.column("category").take(pa.array(first)).combine_chunks().cast(pa.string()),
            **{c: pa.array(v, pa.float64()) for c, v in out.items()}}
    return pa.table(cols, schema=SUMS)


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
    sums: pa.Table
    worst: pa.Table
    length: np.ndarray
    length_sum: float
    length_n: int
    kld: np.ndarray | None = None
    kld_boot: np.ndarray | None = None
    node: str = ""
    dp: np.ndarray | None = None


def _extreme(values: np.ndarray, pick) -> float | None:
    values = values[np.isfinite(values)]
    return float(pick(values)) if len(values) else None


def partial(cousin: str, rows: pa.Table, *, token_level: bool, worst_n: int, seed: int,
            quantile_resamples: int, node: str = "") -> Partial:
    """The aggregate of `rows` (schema.DRIFT, one cousin, whole prompts: every row of a prompt in
    the same worker). Quantile CIs draw `quantile_resamples` Poisson weights per prompt."""
    ok = rows.filter(pc.is_null(rows.column("error")))
    sums = prompt_sums(ok, token_level)
    ratio = _col(ok, "length_ratio")
    ratio = ratio[np.isfinite(ratio)]
    p = Partial(cousin=cousin, rows=rows.num_rows, error_rows=rows.num_rows - ok.num_rows, sums=sums,
                worst=top_rows(ok, not token_level, worst_n), length=LENGTH_GRID.counts(ratio),
                length_sum=float(ratio.sum()), length_n=int(len(ratio)), node=node)
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
            uniq = sums.column("prompt_id").to_pylist()
            at = np.searchsorted(np.asarray(uniq, dtype=object), np.asarray(pids, dtype=object))[row]
            weights = poisson_weights(uniq, quantile_resamples, seed)
            p.kld_boot = weighted_counts(KLD_BOOT_GRID, kld, at, weights)
    return p


# --- partials through Ray Data: one row per (partition, cousin) ----------------------------------

PARTIALS = pa.schema([("cousin", pa.string()), ("node", pa.string()), ("rows", pa.int64()),
                      ("error_rows", pa.int64()), ("length_sum", pa.float64()), ("length_n", pa.int64()),
                      *[(k, pa.float64()) for k in EXTREMES], ("sums", pa.binary()), ("worst", pa.binary()),
                      ("length", pa.binary()), ("kld", pa.binary()), ("kld_boot", pa.binary()), ("dp", pa.binary())])


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


def to_rows(parts: list[Partial]) -> pa.Table:
    cols = {
        "cousin": [p.cousin for p in parts], "node": [p.node for p in parts], "rows": [p.rows for p in parts],
        "error_rows": [p.error_rows for p in parts], "length_sum": [p.length_sum for p in parts],
        "length_n": [p.length_n for p in parts], **{k: [getattr(p, k) for p in parts] for k in EXTREMES},
        "sums": [_ipc(p.sums) for p in parts], "worst": [_ipc(p.worst) for p in parts],
        "length": [_arr(p.length) for p in parts], "kld": [_arr(p.kld) for p in parts],
        "kld_boot": [_arr(p.kld_boot) for p in parts], "dp": [_arr(p.dp) for p in parts],
    }
    return pa.table(cols, schema=PARTIALS)


def from_rows(batch: pa.Table) -> list[Partial]:
    out = []
    for r in batch.to_pylist():
        boot = _unarr(r["kld_boot"])
        out.append(Partial(cousin=r["cousin"], rows=r["rows"], error_rows=r["error_rows"], sums=_table(r["sums"]),
                           worst=_table(r["worst"]), length=_unarr(r["length"]), length_sum=r["length_sum"],
                           length_n=r["length_n"], kld=_unarr(r["kld"]),
                           kld_boot=None if boot is None else boot.reshape(-1, KLD_BOOT_GRID.buckets),
                           node=r["node"], dp=_unarr(r["dp"]), **{k: r[k] for k in EXTREMES}))
    return out


# --- the driver's side ------------------------------------------------------------------------------

@dataclass
class Merged(Extremes):
    """Every partial of one cousin, merged as they arrive: histograms add, top-N rows re-rank, the
    per-prompt sums (the bootstrap's input) go to a local spill file, so the driver holds one
    cousin's sums at a time, and only while its summary is made."""

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
    tokens: float = 0.0
    kld_sum: float = 0.0
    _spill: object = None  # a temporary Parquet file of the per-prompt sums (deleted with the object)
    _writer: object = None

    def add(self, p: Partial) -> None:
        self.rows += p.rows
        self.error_rows += p.error_rows
        if p.node:
            self.nodes.add(p.node)
        if p.sums.num_rows:
            self._write(p.sums)
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

    def _write(self, sums: pa.Table) -> None:
        import tempfile

        import pyarrow.parquet as pq

        if self._writer is None:
            self._spill = tempfile.NamedTemporaryFile(prefix="cousins-sums-", suffix=".parquet")
            self._writer = pq.ParquetWriter(self._spill.name, SUMS, compression="none")
        self._writer.write_table(sums)
        self.tokens += float(pc.sum(sums.column("T")).as_py() or 0)
        self.kld_sum += float(pc.sum(sums.column("kld")).as_py() or 0)

    def prompt_sums(self) -> pa.Table:
        """Every prompt's sums, in prompt id order (the order the bootstrap's clusters take), read
        back from the spill file."""
        import pyarrow.parquet as pq

        if self._writer is None:
            return SUMS.empty_table()
        if self._writer.is_open:
            self._writer.close()
        return pq.read_table(self._spill.name).sort_by("prompt_id")

    def view(self) -> "ReportView":
        return ReportView(text_only=self.text_only, kld=self.kld,
                          kld_mean=self.kld_sum / self.tokens if self.tokens else None, length=self.length,
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


def merge_all(batches, cousins: dict[str, bool], worst_n: int) -> dict[str, Merged]:
    """Merge a stream of PARTIALS batches; `cousins`: name -> text only."""
    merged = {name: Merged(name, text_only, worst_n) for name, text_only in cousins.items()}
    for batch in batches:
        for p in from_rows(batch):
            merged[p.cousin].add(p)
    return merged


def merge_table(drift: pa.Table, *, text_only: set[str] = frozenset(), worst_n: int = 10, seed: int = 0,
                quantile_resamples: int = 200) -> dict[str, Merged]:
    """Every cousin of an in-memory drift table as one partial each (tests and small tables)."""
    names = list(dict.fromkeys(drift.column("cousin").to_pylist()))
    parts = [partial(n, drift.filter(pc.equal(drift.column("cousin"), n)), token_level=n not in text_only,
                     worst_n=worst_n, seed=seed, quantile_resamples=quantile_resamples) for n in names]
    return merge_all([to_rows(parts)], {n: n in text_only for n in names}, worst_n)
