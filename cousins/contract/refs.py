"""What a model reference names: a local path, a storage URL or a Hugging Face hub id. Pure string
rules (no I/O beyond `os.path.exists`), shared by the config's validation and cousins/engine/checkpoints.py,
which turns a reference into files."""

from __future__ import annotations

import os
import re

HUB_PREFIX = "hf://"
# owner/name as the hub spells repository ids (no leading ./, no .., two parts)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def kind(ref: str, *, build: str | None = None) -> str:
    """local | url | hub. A reference that exists here, starts like a path, or is built by the
    project (`build`) is local; `hf://…` and an absent `owner/name` are hub ids; other `…://`
    references are storage URLs."""
    if ref.startswith(HUB_PREFIX):
        return "hub"
    if "://" in ref:
        return "url"
    if build is not None or ref.startswith(("/", "./", "../", "~")) or os.path.exists(ref):
        return "local"
    return "hub" if _HUB_ID.match(ref) else "local"


def is_gguf(ref: str) -> bool:
    return ref.lower().endswith(".gguf")
