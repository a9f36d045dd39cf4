"""Exact per-token KLD over the tokenizer's vocabulary, from two models' full-vocabulary logprobs
(drift.kld=exact; the actor is cousins/kld.py). Pure NumPy: no Ray, no vLLM import.

Why over the tokenizer's vocabulary V and not the logit heads: checkpoints pad their heads past
the tokenizer (Qwen2.5-7B's head is 152,064 wide, the 1.5B's 151,936, their tokenizer ~151,665
entries), and vLLM reports every row of each head. Ids ≥ V are no token; the two heads need not
even have the same such rows. So ids < V are compared one by one and each model's ids ≥ V are
folded into ONE "tail" bucket:

    KL(p ‖ q) = Σ_{i<V} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail)

(and KL(q ‖ p) the same way round). The tail mass is kept per token (`tail_mass_tokens`: the
larger of the two models', so one column says whether the padded rows matter anywhere).

What is an error, never a number: a NaN or +inf logprob (head or tail), a distribution whose
mass is not 1 within MASS_TOL, or an infinite KL(p ‖ q) (the cousin gives probability 0 to an id
or to the tail where the original does not). The reduction raises PositionError naming the
position; the actor makes that one row an error row. An infinite KL(q ‖ p) alone (e.g. the
original's head is exactly V wide and the cousin's is padded) leaves KL(p ‖ q) valid: that
position's reverse KLD is NaN here and null in the rows. Float round-off can leave a KL a hair
below 0 (the masses sum to 1 only within float32's error): it is set to 0 explicitly, after the
checks, never through max(0, nan).

Memory: positions are reduced in chunks of C = max(1, CHUNK_CELLS // (V + 1)) positions; a chunk
holds, per model, its flat entries (ids int64 + logprobs float64: 16 B each, about V + 1 a
position) and a dense (C, V) float64 array, plus about four such arrays of temporaries: about
(2·16 + 6·8)·CHUNK_CELLS bytes ≈ 80 MiB at CHUNK_CELLS = 2^20 whatever the output's length (C = 6
at V = 152k). The whole-vocabulary lists vLLM itself returns (FlatLogprobs: Python floats and
ints, ~56 B per entry and model) are vLLM's, outside this bound.
"""

from __future__ import annotations

import array
from dataclasses import dataclass

import numpy as np

CHUNK_CELLS = 1 << 20  # float64 cells of one dense (positions, V) array of a chunk
MASS_TOL = 1e-3  # |Σ p − 1| allowed: float32 logprobs over 152k entries sum to 1 within ~1e-5


class PositionError(ValueError):
    """One position's logprobs cannot give a finite KLD; `position` counts from the output's start."""

    def __init__(self, position: int, problem: str):
        super().__init__(f"output position {position}: {problem}")
        self.position, self.problem = position, problem


@dataclass
class Exact:
    """Per position of an output: KL(p ‖ q), KL(q ‖ p) (NaN where infinite) and the larger of the
    two models' tail masses (ids ≥ V)."""

    kld: np.ndarray
    rkld: np.ndarray
    tail_mass: np.ndarray


def _ints(values) -> np.ndarray:
    try:  # array.array reads a list of Python ints ~20% faster than np.asarray
        return np.frombuffer(array.array("q", values), dtype=np.int64)
    except TypeError:
        return np.asarray(values, dtype=np.int64)


def _floats(values) -> np.ndarray:
    try:
        return np.frombuffer(array.array("d", values), dtype=np.float64)
    except TypeError:
        return np.asarray(values, dtype=np.float64)


def chunks(prompt_logprobs, start: int, n: int, size: int):
    """Positions start..start+n of a vLLM prompt-logprobs result, `size` at a time, as
    (ids, logprobs, counts): every entry of the chunk's positions flat (int64, float64) and the
    number of entries of each position. Reads vLLM's FlatLogprobs by slicing its flat lists (one
    conversion per chunk), or its list of dicts (one per position)."""
    f = prompt_logprobs
    for t0 in range(start, start + n, size):
        t1 = min(t0 + size, start + n)
        if hasattr(f, "start_indices"):
            s, e = f.start_indices[t0:t1], f.end_indices[t0:t1]
            counts = np.asarray(e, np.int64) - np.asarray(s, np.int64)
            if all(a == b for a, b in zip(s[1:], e[:-1])):  # consecutive positions: one slice
                ids, lps = _ints(f.token_ids[s[0]:e[-1]]), _floats(f.logprobs[s[0]:e[-1]])
            else:
                ids = np.concatenate([_ints(f.token_ids[a:b]) for a, b in zip(s, e)])
                lps = np.concatenate([_floats(f.logprobs[a:b]) for a, b in zip(s, e)])
        else:
            pos = [p or {} for p in f[t0:t1]]
            counts = np.asarray([len(p) for p in pos], np.int64)
            ids = np.fromiter((k for p in pos for k in p.keys()), np.int64, int(counts.sum()))
            lps = np.fromiter((lp.logprob for p in pos for lp in p.values()), np.float64, int(counts.sum()))
        yield ids, lps, counts


def _bad(x: np.ndarray) -> np.ndarray:
    """NaN or +inf (−inf is a probability of 0)."""
    return np.isnan(x) | np.isposinf(x)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log Σ exp, −inf for a row of −infs."""
    m = x.max(axis=1, initial=-np.inf)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(x - safe[:, None]).sum(axis=1))


def _dense(ids, lps, counts, vocab: int, who: str, first: int):
    """(head, log tail): the chunk's (C, V) logprobs over the vocabulary (−inf where an id is not
    listed) and each position's log tail mass (−inf without a tail). Raises on bad values."""
    c = len(counts)
    row = np.repeat(np.arange(c), counts)
    if _bad(lps).any():
        i = int(np.flatnonzero(_bad(lps))[0])
        raise PositionError(first + int(row[i]), f"the {who}'s logprob of id {int(ids[i])} is {lps[i]}: "
                                                 "the engine returned a non-finite logprob")
    if (ids < 0).any():
        raise PositionError(first + int(row[np.flatnonzero(ids < 0)[0]]), f"the {who} lists a negative token id")
    head = np.full((c, vocab), -np.inf)
    inside = ids < vocab
    # A position lists its own token first and again in rank order: both writes hold one value.
    head[row[inside], ids[inside]] = lps[inside]
    log_tail = np.full(c, -np.inf)
    if not inside.all():
        out = ~inside
        tail = np.full((c, int(ids[out].max()) - vocab + 1), -np.inf)
        tail[row[out], ids[out] - vocab] = lps[out]  # dense as well: the duplicate is written, not added
        log_tail = _logsumexp(tail)
    return head, log_tail


def reduce_chunk(p, q, vocab: int, first: int) -> Exact:
    """One chunk of positions: p, q are (ids, logprobs, counts) of the original and the cousin
    (chunks()); `first` is the chunk's first position in the output (for error messages)."""
    lp, lpt = _dense(*p, vocab, "original", first)
    lq, lqt = _dense(*q, vocab, "cousin", first)
    with np.errstate(invalid="ignore", over="ignore"):
        pp, qq = np.exp(lp), np.exp(lq)
        pt, qt = np.exp(lpt), np.exp(lqt)
        for who, mass in (("original", pp.sum(axis=1) + pt), ("cousin", qq.sum(axis=1) + qt)):
            off = np.abs(mass - 1.0) > MASS_TOL
            if off.any():
                t = int(np.flatnonzero(off)[0])
                raise PositionError(first + t, f"the {who}'s probabilities sum to {mass[t]:.6g}, not 1 (within "
                                               f"{MASS_TOL:g}): its logprobs are incomplete (ask for the whole "
                                               "vocabulary: prompt_logprobs=-1) or not normalised")
        zero_q = ((pp > 0) & np.isneginf(lq)).any(axis=1) | ((pt > 0) & np.isneginf(lqt))
        if zero_q.any():
            t = int(np.flatnonzero(zero_q)[0])
            where = ("its ids ≥ the vocabulary size (the padded rows of the heads)" if pt[t] > 0 and lqt[t] == -np.inf
                     else f"id {int(np.flatnonzero((pp[t] > 0) & np.isneginf(lq[t]))[0])}")
            raise PositionError(first + t, f"the cousin gives probability 0 to {where} where the original does not: "
                                           "KL(original ‖ cousin) is infinite there")
        d = lp - lq  # NaN where both are −inf; those entries are masked out below
        kld = np.where(pp > 0, pp * d, 0.0).sum(axis=1) + np.where(pt > 0, pt * (lpt - lqt), 0.0)
        rkld = np.where(qq > 0, -qq * d, 0.0).sum(axis=1) + np.where(qt > 0, qt * (lqt - lpt), 0.0)
    if not np.isfinite(kld).all():  # cannot happen after the checks above; never let it through
        t = int(np.flatnonzero(~np.isfinite(kld))[0])
        raise PositionError(first + t, f"KL(original ‖ cousin) came out {kld[t]}")
    rkld = np.where(np.isfinite(rkld), rkld, np.nan)  # infinite: the original gives 0 where the cousin does not
    # KL ≥ 0; round-off over ~V terms of float32 logprobs can leave −1e-9 or so: clamp it.
    return Exact(kld=np.where(kld < 0.0, 0.0, kld), rkld=np.where(rkld < 0.0, 0.0, rkld),
                 tail_mass=np.maximum(pt, qt))


def exact_kld(p_logprobs, q_logprobs, start: int, n: int, vocab: int, chunk_cells: int = CHUNK_CELLS) -> Exact:
    """KL(p ‖ q), KL(q ‖ p) and the tail mass at positions start..start+n of two vLLM
    prompt-logprobs results over the vocabulary [0, vocab); raises PositionError (the position
    counted from `start`) at the first position that cannot give a finite KLD."""
    size = max(1, chunk_cells // (vocab + 1))
    parts = [reduce_chunk(p, q, vocab, i * size) for i, (p, q) in
             enumerate(zip(chunks(p_logprobs, start, n, size), chunks(q_logprobs, start, n, size)))]
    if not parts:
        return Exact(np.zeros(0), np.zeros(0), np.zeros(0))
    return Exact(*(np.concatenate([getattr(x, k) for x in parts]) for k in ("kld", "rkld", "tail_mass")))
