"""The compare step: join one cousin's generations and scores with the original's by row key, and
compute its drift rows (schema.DRIFT). Arrow in, Arrow out; no Ray, no models.

Inputs, all keyed by (prompt_id, sample_index):
- the original's and the cousin's generations (GENERATIONS rows: text, token ids, finish reason);
- the original's and the cousin's scores over the ORIGINAL's outputs (SCORES rows: top-k and the
  logprob of the original's token at every output position).
A text-only cousin has no scores: its token columns are null and its sequence metrics stand.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from cousins.contract import schema
from cousins.drift import answers, metrics, options

GEN_COLUMNS = ["prompt_id", "sample_index", "category", "output_text", "output_token_ids", "finish_reason",
               "output_tokens", "error", "thinking_tokens", "thinking_finished", "answer_offset", "choice_logprobs",
               "choice_chars"]
EXACT_COLUMNS = ["kld_tokens", "rkld_tokens", "tail_mass_tokens", "error"]
SCORE_COLUMNS = ["prompt_id", "sample_index", "topk_token_ids", "topk_logprobs", "token_logprobs", "error"]


def _index(table: pa.Table | None) -> dict[str, int]:
    if table is None:
        return {}
    return {k: i for i, k in enumerate(schema.row_keys(table))}


def _matrix(nested: list[list[float]] | None, dtype) -> np.ndarray:
    if not nested:
        return np.zeros((0, 1), dtype)
    return np.asarray(nested, dtype=dtype)


def _spans(ids_a: list[int], ids_b: list[int], text_a: str, text_b: str, j: int | None,
           decode: Callable[[list[int]], str] | None) -> tuple:
    """Character spans [start, end) of the first divergent token j in each text (nulls if none)."""
    if j is None:
        return None, None, None, None

    def span(ids: list[int], text: str) -> tuple[int, int]:
        if decode is not None:
            start, end = len(decode(ids[:j])), len(decode(ids[:j + 1]))
        else:  # no tokenizer at hand: the first differing character to the end of its word
            start = len(_common_prefix(text_a, text_b))
            end = start
            while end < len(text) and not text[end].isspace():
                end += 1
        start = min(start, len(text))
        return start, max(start, min(end, len(text)))

    a, b = span(ids_a, text_a), span(ids_b, text_b)
    return a[0], a[1], b[0], b[1]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def compare(cousin: str, original_gens: pa.Table, cousin_gens: pa.Table, original_scores: pa.Table | None,
            cousin_scores: pa.Table | None, *, rule: answers.Rule | str = "contains",
            references: dict[str, str] | None = None, choices: dict[str, list[str]] | None = None,
            checkers: dict[str, str] | None = None,
            decode: Callable[[list[int]], str] | None = None, exact_kld: pa.Table | None = None,
            count_tokens: Callable[[str], int] | None = None) -> pa.Table:
    """Drift rows of `cousin`, one per row of the original's generations.

    references: prompt_id -> reference answer (labelled prompts only); choices: prompt_id -> the
    options of a multiple-choice prompt; checkers: prompt_id -> the row's own answer checker (the
    corpus's); the others are judged by `rule` (cousins/drift/answers.py).
    decode: token ids -> text, to place the first divergent token in each text (optional).
    count_tokens: text -> its token count, to place the end of a thinking span (optional: else
    the span's share of the characters).
    exact_kld: the cousin's KLD rows (schema.KLD, drift.kld=exact): their per-token KLD replaces
    the top-k bound (the rest mass stays: it says how loose the bound would have been), and
    their reverse KLD and tail mass fill those columns (null in top-k mode).
    """
    references, choices, checkers = references or {}, choices or {}, checkers or {}
    rule = answers.Rule.of(rule)
    og = original_gens.to_pylist()
    cg_rows = cousin_gens.to_pylist()
    cg = {k: cg_rows[i] for k, i in _index(cousin_gens).items()}
    text_only = original_scores is None or cousin_scores is None
    so_rows = [] if text_only else original_scores.to_pylist()
    sc_rows = [] if text_only else cousin_scores.to_pylist()
    so = {} if text_only else {k: so_rows[i] for k, i in _index(original_scores).items()}
    sc = {} if text_only else {k: sc_rows[i] for k, i in _index(cousin_scores).items()}
    exact = None
    if exact_kld is not None and not text_only:
        ex_rows = exact_kld.select(EXACT_COLUMNS).to_pylist()
        exact = {k: ex_rows[i] for k, i in _index(exact_kld).items()}

    out: list[dict] = []
    for key, o in zip(schema.row_keys(original_gens), og):
        row = {"prompt_id": o["prompt_id"], "sample_index": o["sample_index"], "cousin": cousin,
               "category": o["category"], "original_text": o["output_text"]}
        c = cg.get(key)
        err = (f"original: {o['error']}" if o["error"] else
               "cousin: no generation row" if c is None else
               f"cousin: {c['error']}" if c["error"] else None)
        if c is not None:
            row["cousin_text"] = c["output_text"]
        if err is None and not text_only:
            s_o, s_c = so.get(key), sc.get(key)
            err = ("original score: missing" if s_o is None else f"original score: {s_o['error']}" if s_o["error"]
                   else "cousin score: missing" if s_c is None else f"cousin score: {s_c['error']}" if s_c["error"]
                   else None)
        if err is not None:
            out.append({**row, "error": err})
            continue
        if exact is not None:
            ex = exact.get(key)
            err = ("exact KLD: missing" if ex is None else f"exact KLD: {ex['error']}" if ex["error"] else None)
            if err is not None:
                out.append({**row, "error": err})
                continue
        pid = o["prompt_id"]
        row.update(_sequence_metrics(o, c, references.get(pid), rule, decode, choices.get(pid), count_tokens,
                                     checkers.get(pid)))
        row.update(options.option_row(o, c, references.get(pid), choices.get(pid)))
        if not text_only:
            row.update(_token_row(o, so[key], sc[key]))
            if exact is not None and "error" not in row:
                row.update(_exact(exact[key], row["tokens"]))
        out.append(row)
    cols = {f.name: [r.get(f.name) for r in out] for f in schema.DRIFT}
    return pa.Table.from_pydict(cols, schema=schema.DRIFT)


def _thinking(row: dict, ids: list[int], text: str, count_tokens) -> tuple[int | None, bool | None, str]:
    """(thinking tokens, finished, the answer's text) of a generation row: as its engine split it
    (cousins/engine/thinking.py), or, for rows generated before that, split here at <think>…</think>
    (tokens up to the span's end counted with the original's tokenizer; all of them when it never
    closed). (None, None, text) without a span."""
    if row.get("answer_offset") is not None:
        return row["thinking_tokens"], row["thinking_finished"], text[row["answer_offset"]:]
    split = answers.split_thinking(text)
    if split.thinking is None:
        return None, None, text
    if not split.finished:
        return len(ids), False, split.answer
    head = text[:len(text) - len(split.answer)]
    n = count_tokens(head) if count_tokens else round(len(ids) * len(head) / max(len(text), 1))
    return min(len(ids), n), True, split.answer


def _sequence_metrics(o: dict, c: dict, reference: str | None, rule: answers.Rule, decode,
                      choices: list[str] | None = None, count_tokens=None, checker: str | None = None) -> dict:
    ids_o, ids_c = o["output_token_ids"] or [], c["output_token_ids"] or []
    text_o, text_c = o["output_text"] or "", c["output_text"] or ""
    # a reasoning model's thinking is measured apart: the text metrics compare the answers
    th_o, fin_o, ans_o = _thinking(o, ids_o, text_o, count_tokens)
    th_c, fin_c, ans_c = _thinking(c, ids_c, text_c, count_tokens)
    thinking = th_o is not None or th_c is not None
    j = metrics.first_divergence(ids_o, ids_c)
    spans = _spans(ids_o, ids_c, text_o, text_c, j, decode)
    row = {
        "original_tokens": len(ids_o), "cousin_tokens": len(ids_c),
        "length_ratio": metrics.safe_ratio(len(ids_c), len(ids_o)),
        "exact_match": j is None, "first_divergence": j,
        "chrf": metrics.chrf(ans_c, ans_o), "rouge_l": metrics.rouge_l(ans_c, ans_o),
        "finish_original": o["finish_reason"], "finish_cousin": c["finish_reason"],
        "finish_changed": o["finish_reason"] != c["finish_reason"],
        "div_original_start": spans[0], "div_original_end": spans[1],
        "div_cousin_start": spans[2], "div_cousin_end": spans[3],
    }
    if thinking:  # a side without a span thinks 0 tokens and finished
        row.update(thinking_original_tokens=th_o or 0, thinking_cousin_tokens=th_c or 0,
                   thinking_finished_original=fin_o is not False, thinking_finished_cousin=fin_c is not False)
    if reference is not None:  # the final answers, as graders read them (cousins/drift/answers.py)
        try:
            vo = rule.judge(ans_o, reference, choices, checker)
            vc = rule.judge(ans_c, reference, choices, checker)
        except answers.BadReference:
            return row  # a reference its checker cannot read: the row is not judged
        row.update(correct_original=vo.correct, correct_cousin=vc.correct, flip=vo.correct != vc.correct,
                   checker=vo.checker, answer_original=vo.extracted, answer_cousin=vc.extracted,
                   unparsed_original=vo.unparsed, unparsed_cousin=vc.unparsed)
    return row


def _token_row(o: dict, s_o: dict, s_c: dict) -> dict:
    y = np.asarray(o["output_token_ids"] or [], dtype=np.int64)
    p_y = np.asarray(s_o["token_logprobs"] or [], dtype=np.float64)
    q_y = np.asarray(s_c["token_logprobs"] or [], dtype=np.float64)
    if not (len(y) == len(p_y) == len(q_y) == len(s_o["topk_token_ids"] or []) == len(s_c["topk_token_ids"] or [])):
        return {"error": f"scores cover {len(p_y)}/{len(q_y)} positions of an output of {len(y)} tokens"}
    m = metrics.token_metrics(_matrix(s_o["topk_token_ids"], np.int64), _matrix(s_o["topk_logprobs"], np.float64),
                              _matrix(s_c["topk_token_ids"], np.int64), _matrix(s_c["topk_logprobs"], np.float64),
                              y, p_y, q_y)
    n = len(y)
    return {
        "tokens": n,
        "kld_tokens": m["kld"].astype(np.float32).tolist(),
        "rest_mass_tokens": m["rest_mass"].astype(np.float32).tolist(),
        "margin_tokens": m["margin"].astype(np.float32).tolist(),
        "same_top1_tokens": m["same_top1"].tolist(),
        "dp_tokens": m["dp"].astype(np.float32).tolist(),
        "kld_mean": float(m["kld"].mean()) if n else None,
        "kld_max": float(m["kld"].max()) if n else None,
        "same_top1": float(m["same_top1"].mean()) if n else None,
        "nll_original": float(m["nll_p"].sum()),
        "nll_cousin": float(m["nll_q"].sum()),
        "nll_original_sq": float((m["nll_p"] ** 2).sum()),
        "nll_cousin_sq": float((m["nll_q"] ** 2).sum()),
        "nll_cross": float((m["nll_p"] * m["nll_q"]).sum()),
    }


def _exact(ex: dict, tokens: int) -> dict:
    """The exact KLD row's per-token columns, checked against the output's length. Reverse KLD and
    tail mass may be null (KLD parts written before they existed)."""
    kld = ex["kld_tokens"] or []
    if len(kld) != tokens:
        return {"error": f"exact KLD covers {len(kld)} positions of an output of {tokens} tokens"}
    for c in ("rkld_tokens", "tail_mass_tokens"):
        if ex.get(c) is not None and len(ex[c]) != tokens:
            return {"error": f"exact KLD's {c} covers {len(ex[c])} positions of an output of {tokens} tokens"}
    k = np.asarray(kld, dtype=np.float64)
    return {"kld_tokens": k.astype(np.float32).tolist(), "kld_mean": float(k.mean()) if tokens else None,
            "kld_max": float(k.max()) if tokens else None, "rkld_tokens": ex.get("rkld_tokens"),
            "tail_mass_tokens": ex.get("tail_mass_tokens")}
