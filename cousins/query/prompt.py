"""One prompt of a committed run across its models: the prompt (messages, category, reference),
then each sample's generations by every model of the run side by side, in the run's model order,
and for a drift run each cousin's drift figures against the original (`vs_original`) with the first
divergence as a token index and as character spans in both texts. The prompts, generations and
drift rows are read from explicit file lists with the prompt id (and sample) filter pushed down.
"""

from __future__ import annotations

import pyarrow.dataset as ds

from cousins.contract import schema
from cousins.query.inputs import BadInput, NotFound, check_text, is_name
from cousins.query.runs import clean, committed_run, dataset, reads_run_data
from cousins.run.layout import DRIFT, part_files
from cousins.run.storage import Location

_GEN_COLUMNS = ["prompt_id", "sample_index", "model", "seed", "output_text", "finish_reason",
                "output_tokens", "error", "thinking_tokens", "thinking_finished"]
# what a cousin's generation shows of its drift row: figures, the final answers the checker read,
# the options by likelihood
_VS_FIGURES = ["exact_match", "first_divergence", "kld_mean", "same_top1", "chrf", "length_ratio", "correct_original",
               "correct_cousin", "flip", "checker", "answer_original", "answer_cousin", "option_original",
               "option_cousin", "option_kl", "error"]
_VS_COLUMNS = ["cousin", "sample_index", "div_original_start", "div_original_end", "div_cousin_start",
               "div_cousin_end", *_VS_FIGURES]


@reads_run_data
def prompt_view(root: Location, run_id: str, prompt_id: str, *, sample_index: int | None = None) -> dict:
    """One prompt's generations by every model of the run, side by side, each sample in turn.

    For a drift run every cousin's generation carries `vs_original`: its drift row's figures and
    the first divergence, as the token index and the character spans [start, end) of the first
    divergent token in the original's text and in the cousin's."""
    layout, manifest = committed_run(root, run_id)
    check_text(prompt_id, "prompt id")
    if sample_index is not None and (isinstance(sample_index, bool) or not isinstance(sample_index, int)
                                     or not 0 <= sample_index < 2**31):
        raise BadInput("sample_index must be a non-negative integer")
    prompts = part_files(layout.prompts)
    where = ds.field("prompt_id") == prompt_id
    found = dataset(root, prompts, schema.PROMPTS).to_table(filter=where).to_pylist() if prompts else []
    if not found:
        raise NotFound(f"run {run_id!r} has no prompt {prompt_id!r}")
    prompt = found[0]

    models = [m for m in manifest.get("models") or [] if isinstance(m, dict) and is_name(m.get("name"))]
    order = {m["name"]: i for i, m in enumerate(models)}
    kinds = {m["name"]: m.get("kind") for m in models}
    original = models[0]["name"] if models else None
    gen_files = [f for m in models for f in part_files(layout.generations(m["name"]))]
    if sample_index is not None:
        where = where & (ds.field("sample_index") == sample_index)
    gens = (dataset(root, gen_files, schema.GENERATIONS).to_table(columns=_GEN_COLUMNS, filter=where).to_pylist()
            if gen_files else [])
    drift_parts = [f for fs in layout.parts_by_name(DRIFT).values() for f in fs]
    vs = (dataset(root, drift_parts, schema.DRIFT).to_table(columns=_VS_COLUMNS, filter=where).to_pylist()
          if drift_parts else [])
    vs_by = {(r["cousin"], r["sample_index"]): r for r in vs}

    samples: dict[int, list[dict]] = {}
    for g in sorted(gens, key=lambda g: (g["sample_index"], order.get(g["model"], len(order)), g["model"])):
        d = vs_by.get((g["model"], g["sample_index"]))
        entry = {"model": g["model"], "kind": kinds.get(g["model"]),
                 **{k: g[k] for k in ("seed", "output_text", "finish_reason", "output_tokens", "error",
                                      "thinking_tokens", "thinking_finished")},
                 "vs_original": None}
        if d is not None:
            entry["vs_original"] = {
                **{k: d[k] for k in _VS_FIGURES},
                "original_span": _span(d["div_original_start"], d["div_original_end"]),
                "cousin_span": _span(d["div_cousin_start"], d["div_cousin_end"]),
            }
        samples.setdefault(g["sample_index"], []).append(entry)
    return clean({
        "run_id": run_id, "original": original,
        "prompt": {k: prompt[k] for k in ("prompt_id", "messages", "category", "reference", "choices")},
        "samples": [{"sample_index": i, "generations": samples[i]} for i in sorted(samples)],
    })


def _span(start, end) -> list[int] | None:
    return None if start is None or end is None else [start, end]
