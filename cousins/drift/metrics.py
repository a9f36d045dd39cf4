"""Drift metrics: pure functions on numpy arrays and strings. No Ray, no I/O, no models.

Token metrics compare, at every position t of the ORIGINAL's output y, the original's next-token
distribution p with the cousin's q, both teacher-forced over the same tokens (docs/metrics.md,
"Drift metrics"). Only the top-k of each is stored, plus each model's logprob of y_t.

The KLD estimate and its bound
------------------------------
A token's probability is known in both distributions when it is in both top-k lists, or is y_t
(whose logprob each model reports). Call that set S. Every other token (outside either top-k) goes
into one "rest" bucket, in both distributions, so p and q are compared on the same partition
S ∪ {rest}:

    KLD_topk = Σ_{i∈S} p_i (log p_i − log q_i) + r_p (log r_p − log r_q),   r = 1 − Σ_{i∈S} (·)_i

Merging tokens into a bucket can only lose information (the log-sum inequality), so

    0 ≤ KLD_full − KLD_topk = r_p · KL(p̂_rest ‖ q̂_rest)

where p̂_rest, q̂_rest are p and q renormalised over the rest. The estimate is a lower bound, exact
when the original's rest mass r_p is 0, and its error is r_p times the divergence inside the
tail. Drift rows keep r_p per token (`rest_mass_tokens`), so the tightness is visible per run;
a larger scoring top-k shrinks it.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

KLD_BOUND = ("KLD is estimated from the top-k of both models plus one rest bucket: a lower bound of the "
             "full-vocabulary KLD, short of it by the original's rest mass times the KLD within the tail "
             "(0 ≤ full − estimate = r_p · KL(p_rest ‖ q_rest)).")
KLD_EXACT = ("KLD is computed over the whole vocabulary at every output position (drift.kld=exact): exact, "
             "not a bound; the rest mass shows how far a top-k estimate would have fallen short.")

# Above this mean rest mass (the original's probability outside its top-k, on its own outputs) the
# top-k KLD is flagged as understating the full-vocabulary KLD.
REST_MASS_WARN = 0.05


def rest_mass_warning(name: str, rest_mass: float | None, topk: int) -> str | None:
    """The warning a cousin's summary carries when the top-k KLD may be far below the full KLD."""
    if rest_mass is None or rest_mass <= REST_MASS_WARN:
        return None
    return (f"{name}: the original puts {rest_mass:.1%} of its probability outside its top-{topk} on average "
            f"(over {REST_MASS_WARN:.0%}): the KLD shown is a lower bound that can understate the full "
            f"KLD several times over (full − estimate = r_p · KL(p_rest ‖ q_rest)); score with a larger "
            f"drift.score_topk, or take the exact KLD (drift.kld=exact)")


_TINY = 1e-30


def token_metrics(p_ids: np.ndarray, p_lp: np.ndarray, q_ids: np.ndarray, q_lp: np.ndarray,
                  y: np.ndarray, p_y: np.ndarray, q_y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position metrics for T positions.

    p_ids, p_lp: (T, k) the original's top-k token ids and logprobs (rank order);
    q_ids, q_lp: (T, k') the cousin's; y: (T,) the original's tokens; p_y, q_y: (T,) their logprobs.
    Returns kld, rest_mass (r_p), same_top1, margin (p's top-1 minus top-2 probability),
    dp (q(y) − p(y)), nll_p, nll_q — each (T,).
    """
    p_lp = p_lp.astype(np.float64)
    q_lp = q_lp.astype(np.float64)
    p_y = p_y.astype(np.float64)
    q_y = q_y.astype(np.float64)
    T = len(y)
    if T == 0:
        empty = np.zeros(0)
        return dict(kld=empty, rest_mass=empty, same_top1=np.zeros(0, bool), margin=empty, dp=empty,
                    nll_p=empty, nll_q=empty)

    # For each entry of p's top-k: is its q known (in q's top-k, or it is y_t)? and what is it?
    match = p_ids[:, :, None] == q_ids[:, None, :]  # (T, k, k')
    in_q = match.any(axis=2)
    q_at_p = np.where(in_q, np.take_along_axis(q_lp, match.argmax(axis=2), axis=1), -np.inf)
    is_y = p_ids == y[:, None]
    q_at_p = np.where(is_y & ~in_q, q_y[:, None], q_at_p)
    in_s = in_q | is_y  # (T, k): entries of p's list whose q is known
    # y_t itself, when it is outside p's top-k: known in both through the reported logprobs.
    y_extra = ~is_y.any(axis=1)

    p_prob = np.exp(p_lp)
    q_prob = np.exp(np.where(in_s, q_at_p, -np.inf))
    terms = np.where(in_s, p_prob * (p_lp - np.where(in_s, q_at_p, 0.0)), 0.0).sum(axis=1)
    terms += np.where(y_extra, np.exp(p_y) * (p_y - q_y), 0.0)
    mass_p = np.where(in_s, p_prob, 0.0).sum(axis=1) + np.where(y_extra, np.exp(p_y), 0.0)
    mass_q = q_prob.sum(axis=1) + np.where(y_extra, np.exp(q_y), 0.0)
    r_p = np.clip(1.0 - mass_p, 0.0, 1.0)
    r_q = np.clip(1.0 - mass_q, 0.0, 1.0)
    rest = np.where(r_p > 0, r_p * (np.log(np.maximum(r_p, _TINY)) - np.log(np.maximum(r_q, _TINY))), 0.0)
    kld = np.maximum(terms + rest, 0.0)  # ≥ 0 mathematically; clip float round-off

    top2 = p_prob[:, 1] if p_prob.shape[1] > 1 else np.zeros(T)
    return dict(
        kld=kld,
        rest_mass=r_p,
        same_top1=p_ids[:, 0] == q_ids[:, 0],
        margin=p_prob[:, 0] - top2,
        dp=np.exp(q_y) - np.exp(p_y),
        nll_p=-p_y,
        nll_q=-q_y,
    )


# --- sequences -----------------------------------------------------------------------------------

def first_divergence(a: list[int] | np.ndarray, b: list[int] | np.ndarray) -> int | None:
    """Index of the first differing token; the shorter length when one is a prefix; None if equal."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    if len(diff):
        return int(diff[0])
    return None if len(a) == len(b) else n


def chrf(hypothesis: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF as sacreBLEU's sentence-level `CHRF()` computes it (its defaults: character n-grams of
    orders 1..6, whitespace removed, beta 2, no eps smoothing): precision and recall are averaged
    over the orders both texts have n-grams of, then combined into one F-beta; 0-100. Parity with
    sacrebleu is tested on random and real pairs. One deliberate difference: two texts without any
    non-whitespace character score 100 (identical outputs), where sacreBLEU gives 0."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    if hyp == ref:  # identical (every order's precision and recall 1), or both empty (see above)
        return 100.0
    b2, avg_p, avg_r, effective = beta * beta, 0.0, 0.0, 0
    for n in range(1, order + 1):
        h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if not h or not r:
            continue
        overlap = sum((h & r).values())
        avg_p += overlap / sum(h.values())
        avg_r += overlap / sum(r.values())
        effective += 1
    if not effective:
        return 0.0
    avg_p, avg_r = avg_p / effective, avg_r / effective
    if avg_p + avg_r == 0:
        return 0.0
    return 100.0 * (1 + b2) * avg_p * avg_r / (b2 * avg_p + avg_r)


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyrö): one big-integer
    step per element of `b` instead of a len(a) x len(b) table."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence) over words split on whitespace, case-sensitive and
    with punctuation kept on its word. This is not the `rouge-score` package's tokenisation (which
    lowercases and keeps only [a-z0-9] runs): "Answer: 42." and "answer 42" share no word here, and
    both words there. Model outputs are compared with each other as they were generated, so case and
    punctuation changes count as drift."""
    h, r = hypothesis.split(), reference.split()
    if h == r:  # identical word sequences, or both without words
        return 1.0
    if not h or not r:
        return 0.0
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    p, rc = lcs / len(h), lcs / len(r)
    return 2 * p * rc / (p + rc)


# --- labelled prompts ----------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalise_answer(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space, trimmed."""
    return _NON_ALNUM.sub(" ", text.lower()).strip()


# --- style ---------------------------------------------------------------------------------------

def distinct_n(text: str, n: int) -> float | None:
    """Distinct n-grams / n-grams of one text's words (repetition within an answer); None if none."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def pair_indices(n: int, max_pairs: int = 2000, seed: int = 0) -> list[tuple[int, int]]:
    """Pairs (i, j) of different answers among n: all of them up to `max_pairs`, else a fixed random
    sample that depends on (n, seed) only, so a driver can pick them knowing just how many there are."""
    if n < 2:
        return []
    if n * (n - 1) // 2 <= max_pairs:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, size=max_pairs)
    b = (a + rng.integers(1, n, size=max_pairs)) % n
    return list(zip(a.tolist(), b.tolist()))


def jaccard_pairs(texts: list[str] | dict[int, str], pairs: list[tuple[int, int]]) -> np.ndarray:
    """Word-bigram Jaccard similarity of each pair of texts (texts indexed by the pairs' numbers)."""
    sets: dict[int, set] = {}

    def bigrams(i: int) -> set:
        if i not in sets:
            words = texts[i].split()
            sets[i] = set(zip(words, words[1:]))
        return sets[i]

    out = np.empty(len(pairs))
    for idx, (i, j) in enumerate(pairs):
        u = len(bigrams(i) | bigrams(j))
        out[idx] = len(bigrams(i) & bigrams(j)) / u if u else 1.0
    return out


def safe_ratio(num: float, den: float) -> float | None:
    return num / den if den else None
