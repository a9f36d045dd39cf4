"""Exact per-token KLD over the tokenizer's vocabulary, from two models' full-vocabulary logprobs
(drift.kld=exact; the actor is cousins/engine/kld_actor.py). NumPy to read vLLM's lists, torch (imported
when a chunk is reduced) for the reduction, on whatever device the logprobs are; no Ray, no vLLM import.
The hidden route (cousins/engine/head.py) reduces logits in fewer passes, and through reduce_dense
wherever a chunk holds anything non-finite.

Why over the tokenizer's vocabulary V and not the logit heads: checkpoints pad their heads past
the tokenizer (Qwen2.5-7B's head is 152,064 wide, the 1.5B's 151,936, their tokenizer ~151,665
entries), and vLLM reports every row of each head. Ids ≥ V are no token; the two heads need not
even have the same such rows. So ids < V are compared one by one and each model's ids ≥ V are
folded into ONE "tail" bucket:

    KL(p ‖ q) = Σ_{i<V} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail)

(and KL(q ‖ p) the same way round). The tail mass is kept per token (`tail_mass_tokens`: the
larger of the two models', so one column says whether the padded rows matter anywhere).

When only one head is padded (the other is exactly V wide, as Llama-3's are), the unpadded model
has no tail to compare with: both are compared over the real tokens, the padded side's
distribution renormalised over V (its tail mass still reported), rather than calling every
position infinite.

What is an error, never a number: a NaN or +inf logprob (head or tail), a distribution whose
mass is not 1 within MASS_TOL, or an infinite KL(p ‖ q) (the cousin gives probability 0 to an id
or to the tail where the original does not). The reduction raises PositionError naming the
position; the actor makes that one row an error row. An infinite KL(q ‖ p) alone leaves
KL(p ‖ q) valid: that position's reverse KLD is NaN here and null in the rows. Float round-off can leave a KL a hair
below 0 (the masses sum to 1 only within float32's error): it is set to 0 explicitly, after the
checks, never through max(0, nan).

Each distribution is renormalised over its head in float64 once its mass passed the check (vLLM's
float32 log-softmax leaves every logprob of a position shifted by up to ~2e-4 at a 110k head).

Memory: positions are reduced in chunks of C = max(1, CHUNK_CELLS // (V + 1)) positions; a chunk
holds, per model, its flat entries (ids int64 + logprobs float64 + a scatter index int64: 24 B
each, about W + 1 a position for a head W wide) and a dense (C, W) float64 array, plus about five
such (C, V) arrays of temporaries (a few more since the renormalisation): about (2·24 + 7·8)·CHUNK_CELLS
bytes ≈ 26 MiB at CHUNK_CELLS
= 2^18 whatever the output's length (C = 1 at V = 152k: one position is already 152k wide, and
chunks of 6 were no faster; measured 19 MiB: docs/benchmarks.md). The
whole-vocabulary lists vLLM itself returns (FlatLogprobs: Python ints and floats for ids,
logprobs and ranks, ~20 MiB per position at 152k) are vLLM's, outside this bound; the actor
bounds how many it holds (cousins/engine/kld_actor.py, LOGPROB_ENTRIES_IN_FLIGHT).
"""

from __future__ import annotations

import array
from dataclasses import dataclass

import numpy as np

CHUNK_CELLS = 1 << 18  # float64 cells of one dense (positions, V) array of a chunk
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


def _dense(ids, lps, counts, vocab: int, who: str, first: int) -> np.ndarray:
    """The chunk's (C, W) logprobs by id, W = max(vocab, widest id + 1) (−inf where an id is not
    listed; a position lists its own token first and again in rank order, and both writes hold one
    value)."""
    c = len(counts)
    if len(ids) and ids.min() < 0:
        raise PositionError(first + int(np.repeat(np.arange(c), counts)[np.argmin(ids)]),
                            f"the {who} lists a negative token id")
    w = max(vocab, int(ids.max()) + 1 if len(ids) else 0)
    dense = np.full(c * w, -np.inf)
    at = np.repeat(np.arange(c, dtype=np.int64) * w, counts)
    at += ids
    dense[at] = lps  # one flat scatter: 4x faster than indexing (row, id) pairs
    return dense.reshape(c, w)


def _why_mass(dense: np.ndarray, mass: float, who: str) -> str:
    bad = np.isnan(dense) | np.isposinf(dense)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return f"the {who}'s logprob of id {i} is {dense[i]}: the engine returned a non-finite logprob"
    return (f"the {who}'s probabilities sum to {mass:.6g}, not 1 (within {MASS_TOL:g}): its logprobs are "
            "incomplete (ask for the whole vocabulary: prompt_logprobs=-1) or not normalised")


def _first(mask) -> int:
    """The first True of a 1-d boolean tensor."""
    return int(mask.nonzero()[0, 0])


def reduce_dense(dp, dq, vocab: int, first: int) -> Exact:
    """One chunk of positions from dense logprobs: `dp` (C, Wp) the original's, `dq` (C, Wq) the
    cousin's, float64 torch tensors on any device (−inf where an id has no probability); Wp, Wq ≥
    `vocab`, the rows past it each model's tail. `first`: the chunk's first position in the output
    (for error messages). Each distribution is renormalised over its head in float64 after the
    mass check: vLLM's float32 log-softmax leaves a shift of up to ~2e-4 nats at a 110k head
    (docs/benchmarks.md), which would otherwise go straight into the KLD."""
    import torch

    inf = float("inf")
    tail = [torch.logsumexp(d[:, vocab:], dim=1) if d.shape[1] > vocab else torch.full_like(d[:, 0], -inf)
            for d in (dp, dq)]
    lp, lq = dp[:, :vocab], dq[:, :vocab]
    lpt, lqt = tail
    for who, dense, body, lt in (("original", dp, lp, lpt), ("cousin", dq, lq, lqt)):
        # A NaN or +inf anywhere makes the mass NaN or inf: this one check finds them too.
        mass = torch.exp(body).sum(dim=1) + torch.exp(lt)
        off = ~((mass - 1.0).abs() <= MASS_TOL)
        if off.any():
            t = _first(off)
            raise PositionError(first + t, _why_mass(dense[t].cpu().numpy(), float(mass[t]), who))
    # renormalised in float64 (the check above bounds the correction)
    norm_p = torch.logaddexp(torch.logsumexp(lp, dim=1), lpt)
    norm_q = torch.logaddexp(torch.logsumexp(lq, dim=1), lqt)
    lp, lpt = lp - norm_p[:, None], lpt - norm_p
    lq, lqt = lq - norm_q[:, None], lqt - norm_q
    pp, qq = torch.exp(lp), torch.exp(lq)
    pt, qt = torch.exp(lpt), torch.exp(lqt)
    tails = torch.maximum(pt, qt)
    if (dp.shape[1] > vocab) != (dq.shape[1] > vocab):
        # One head is padded, the other is exactly V wide: the tails cannot be compared (the
        # unpadded model has no such rows, so its tail mass is 0 by construction, not by
        # belief). Both are compared as distributions over real tokens: the padded side
        # renormalised over V, its tail mass still reported.
        if dp.shape[1] > vocab:
            lp = lp - torch.log1p(-torch.clamp(pt, max=1 - 1e-12))[:, None]
            pp = torch.exp(lp)
        else:
            lq = lq - torch.log1p(-torch.clamp(qt, max=1 - 1e-12))[:, None]
            qq = torch.exp(lq)
        pt, qt = torch.zeros_like(pt), torch.zeros_like(qt)
        lpt, lqt = torch.full_like(lpt, -inf), torch.full_like(lqt, -inf)
    d = lp - lq
    if bool(torch.isfinite(lp).all()) and bool(torch.isfinite(lq).all()):  # the usual case: every id listed by both
        kld, rkld = (pp * d).sum(dim=1), -(qq * d).sum(dim=1)
    else:  # an id one model gives −inf: it adds nothing where its own probability is 0
        zero_q = (pp > 0) & torch.isneginf(lq)
        if zero_q.any():
            t = _first(zero_q.any(dim=1))
            raise PositionError(first + t, f"the cousin gives probability 0 to id {_first(zero_q[t])} where "
                                           "the original does not: KL(original ‖ cousin) is infinite there")
        zero = torch.zeros_like(d)
        kld = torch.where(pp > 0, pp * d, zero).sum(dim=1)
        rkld = torch.where(qq > 0, -qq * d, zero).sum(dim=1)
    zero_tail = (pt > 0) & torch.isneginf(lqt)
    if zero_tail.any():
        raise PositionError(first + _first(zero_tail),
                            "the cousin gives probability 0 to its ids ≥ the vocabulary size (the padded rows of "
                            "the heads) where the original does not: KL(original ‖ cousin) is infinite there")
    kld = kld + torch.where(pt > 0, pt * (lpt - lqt), torch.zeros_like(pt))
    rkld = rkld + torch.where(qt > 0, qt * (lqt - lpt), torch.zeros_like(qt))
    kld, rkld, tails = (x.cpu().numpy() for x in (kld, rkld, tails))
    if not np.isfinite(kld).all():  # cannot happen after the checks above; never let it through
        t = int(np.flatnonzero(~np.isfinite(kld))[0])
        raise PositionError(first + t, f"KL(original ‖ cousin) came out {kld[t]}")
    rkld = np.where(np.isfinite(rkld), rkld, np.nan)  # infinite: the original gives 0 where the cousin does not
    # KL ≥ 0; round-off over ~V terms can leave −1e-12 or so: clamp it.
    return Exact(kld=np.where(kld < 0.0, 0.0, kld), rkld=np.where(rkld < 0.0, 0.0, rkld), tail_mass=tails)


def reduce_chunk(p, q, vocab: int, first: int) -> Exact:
    """One chunk of positions: p, q are (ids, logprobs, counts) of the original and the cousin
    (chunks()); `first` is the chunk's first position in the output (for error messages)."""
    import torch

    return reduce_dense(torch.from_numpy(_dense(*p, vocab, "original", first)),
                        torch.from_numpy(_dense(*q, vocab, "cousin", first)), vocab, first)


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
