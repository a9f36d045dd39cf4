"""Secrets kept out of what a run writes: the config as plain data with credentials masked.

`redacted` is the config as config.yaml and the manifest hold it (and the config hash is taken of):
every option whose name holds a credential (`is_secret_name`: fsspec/s3fs/botocore/azure spellings
and HTTP headers, SECRET_NAMES and SECRET_SUFFIXES) becomes "***", and the password of any URL in a
string is masked (`scrub_url`), the user kept.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf

from cousins.contract.config import Config

SECRET_NAMES = ("key", "secret", "token", "password", "passwd", "credentials", "anon_key", "authorization",
                "proxy-authorization", "cookie", "connection_string", "sas_token")
SECRET_SUFFIXES = ("_key", "_secret", "_token", "_password", "_credentials", "_key_id", "_connection_string")
# user:password@ inside a URL (https://user:pass@host/...): the password goes, the user stays
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*:)[^/@\s]+@")


def is_secret_name(name: str) -> bool:
    """Option names that hold credentials (fsspec/s3fs/botocore/azure spellings and HTTP headers),
    not e.g. max_tokens."""
    n = str(name).lower()
    return n in SECRET_NAMES or n.endswith(SECRET_SUFFIXES)


def scrub_url(text: str) -> str:
    """A string with the password of any URL in it masked."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", text)


def redacted(cfg: Config) -> dict:
    """The config as plain data with secrets removed, for config.yaml and the manifest."""
    data = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("***" if is_secret_name(k) else scrub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return scrub_url(node) if isinstance(node, str) else node

    return scrub(data)
