"""A model's `endpoint` block (cousins.contract.config's ModelConfig and CousinConfig): an
OpenAI-compatible server that runs the model instead of an engine of ours. Typed by `to_config`
(`typed_endpoint`), checked by validate.py, sent to by cousins/engine/served.py."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING, OmegaConf

ENDPOINT_APIS = ("completions", "chat")


@dataclass
class EndpointConfig:
    """An OpenAI-compatible server that runs a model (a vLLM server, a provider, a gateway): the
    model's requests go there instead of to an engine actor's own vLLM (cousins/engine/served.py).
    The model's `path` (or `tokenizer`) still names its checkpoint's small files: the tokenizer
    and chat template the prompts are rendered with, as for a local engine."""

    url: str = MISSING  # the API's base, e.g. http://10.0.0.5:8000/v1
    model: str = MISSING  # the name the server serves it under (its /v1/models id)
    api_key_env: str | None = None  # the environment variable holding the API key (never the key itself)
    # completions: the prompt rendered here with the model's own template, sent as token ids to a
    # vLLM server (the tokens a local engine sees) or as text to any other server; chat: the
    # messages, rendered by the server's own template (its template's drift is then measured too)
    api: str = "completions"
    max_concurrency: int = 16  # requests in flight per engine actor
    requests_per_s: float | None = None  # per engine actor; None: no limit
    timeout_s: float = 60.0  # one attempt's limit
    retries: int = 4  # more attempts on 408/409/429/5xx, timeouts and broken connections, backing off


def typed_endpoint(entry, where: str, problems: list[str]) -> EndpointConfig | None:
    """A model's `endpoint` entry as an EndpointConfig (an unknown key or a value of the wrong type
    reported here; a missing url or model is left empty for validate to report with the rest)."""
    if entry is None or isinstance(entry, EndpointConfig):
        return entry
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EndpointConfig), entry)
        for key in OmegaConf.missing_keys(merged):  # reported by validate, with every other problem
            merged[key] = ""
        return OmegaConf.to_object(merged)
    except Exception as e:  # noqa: BLE001 - every bad entry is reported, together
        problems.append(f"{where}: {str(e).splitlines()[0]}")
        return None
