"""What a build prints: its own lines, not transformers' progress bars."""

from __future__ import annotations


def quiet_saves() -> None:
    """No "Writing model shards" bar when a build saves its weights (a build's own lines say what
    it did; the bar is transformers' and says nothing a user can act on)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
