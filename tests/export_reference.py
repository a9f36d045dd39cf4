"""A test oracle of the export's near-duplicate filter: the rule the export applies across workers
(cousins/export/filters.py: LSH bands of MinHash signatures), here sequentially on one list."""

from __future__ import annotations

from cousins.export.filters import band_keys


def near_duplicates(texts: list[str], threshold: float, num_perm: int = 128, seed: int = 1) -> list[bool]:
    """True for each text that shares an LSH band with an earlier text (the rule the export applies
    across workers, here on one list)."""
    seen: set[str] = set()
    dup = []
    for text in texts:
        keys = band_keys(text, threshold, num_perm, seed)
        dup.append(any(k in seen for k in keys))
        seen.update(keys)
    return dup
