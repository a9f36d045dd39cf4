"""Reference implementations the drift tests check the package against; not used by the package.

- `full_kld`: KL(p ‖ q) per position from full-vocabulary logits, the quantity the top-k estimate
  (cousins.drift.metrics.token_metrics) bounds from below;
- `homogenisation_pairs`: the word-bigram Jaccard similarities of a fixed random sample of pairs of
  answers, from one list of texts (the diff picks the pairs by rank and reads back only their texts:
  cousins.drift.metrics.pair_indices and jaccard_pairs).
"""

from __future__ import annotations

import numpy as np

from cousins.drift.metrics import jaccard_pairs, pair_indices


def full_kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) per row from full-vocabulary logits (T, V): the reference the estimate bounds."""
    lp = p_logits - _logsumexp(p_logits)
    lq = q_logits - _logsumexp(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def homogenisation_pairs(texts: list[str], max_pairs: int = 2000, seed: int = 0) -> np.ndarray:
    """Word-bigram Jaccard similarity of pairs of answers to DIFFERENT prompts (a fixed random
    sample of pairs): a model whose answers converge on the same phrasing scores higher."""
    return jaccard_pairs(texts, pair_indices(len(texts), max_pairs, seed))
