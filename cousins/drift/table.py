"""The drift summary as plain text: the table the drift job prints (cousins ranked by drift, the
noise floor last), what it leaves out said in notes, the flips by direction, the thinking figures,
and the capability-against-cost plane (cousins/drift/plane.py)."""

from __future__ import annotations


def _fmt(m: dict | None, pct: bool = False, digits: int = 4) -> str:
    if not m or m.get("value") is None:
        return "-"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.{digits}g}")
    ci = m.get("ci")
    return f"{f(m['value'])} [{f(ci[0])}, {f(ci[1])}]" if ci else f(m["value"])


def drift_table(summary: dict) -> str:
    """The summary as a plain-text table: cousins ranked by drift, the noise floor last; then the
    capability-against-cost plane per model (cousins/drift/plane.py), where the summary has one."""
    from cousins.drift.plane import plane_lines

    header = ("cousin", "kind", "KLD mean [CI]", "rest mass", "KLD p99", "rev KLD", "same top-1 [CI]", "RMS dp",
              "PPL ratio", "Cor lnPPL", "flips", "acc delta", "length ratio", "exact match")
    rows = [header]
    noise = [summary["noise_floor"]] if summary.get("noise_floor") else []
    for s in [*summary["cousins"], *noise]:
        m = s["metrics"]
        if s["error"] is not None and not m:
            rows.append((s["name"], s["kind"], "error (see summary.json)", *["-"] * (len(header) - 3)))
            continue
        rows.append((s["name"], s["kind"], _fmt(m.get("kld_mean")),
                     _fmt(m.get("rest_mass_mean") and {"value": m["rest_mass_mean"]["value"]}, pct=True),
                     _fmt(m.get("kld_p99") and {"value": m["kld_p99"]["value"]}),
                     _fmt(m.get("rkld_mean") and {"value": m["rkld_mean"]["value"]}),
                     _fmt(m.get("same_top1"), pct=True),
                     _fmt(m.get("rms_dp") and {"value": m["rms_dp"]["value"]}, pct=True),
                     _fmt(m.get("ppl_ratio") and {"value": m["ppl_ratio"]["value"]}),
                     _fmt(m.get("ppl_correlation"), pct=True),
                     _fmt(m.get("flip_rate"), pct=True), _fmt(m.get("accuracy_delta"), pct=True),
                     _fmt(m.get("length_ratio"), digits=3), _fmt(m.get("exact_match"), pct=True)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    b = summary["bootstrap"]
    lines.append(f"{summary['prompts']} prompts; [CI] = {100 * b['level']:.0f}% bootstrap over prompts "
                 f"({b['resamples']} resamples); "
                 + ("KLD exact, over the whole vocabulary; " if summary.get("kld") == "exact" else
                    f"KLD from the top-{summary['score_topk']} (a lower bound); ")
                 + f"rest mass: the original's probability outside its top-{summary['score_topk']}")
    checkers = summary.get("answer_checkers")
    if checkers:
        lines.append(f"answers judged by {summary.get('answer_match')} (docs/metrics.md): "
                     + ", ".join(f"{k} on {v} labelled prompts" for k, v in sorted(checkers.items())))
    lines += _flip_lines([*summary["cousins"], *noise])
    lines += _thinking_lines([*summary["cousins"], *noise])
    lines += _choice_lines([*summary["cousins"], *noise])
    lines += [f"warning: {w}" for w in summary.get("warnings") or []]
    lines += _notes(summary)
    return "\n".join(lines + plane_lines(summary.get("plane")))


def _flip_lines(models: list[dict]) -> list[str]:
    """Each cousin's flips by direction, with McNemar's exact p-value (paired correctness)."""
    lines = []
    for s in models:
        m = s["metrics"] or {}
        if (m.get("flip_rate") or {}).get("value") is None or "flip_correct_to_wrong" not in m:
            continue
        p = (m.get("flip_mcnemar_p") or {}).get("value")
        lines.append(f"  {s['name']}: {_fmt(m['flip_correct_to_wrong'], pct=True)} correct→wrong, "
                     f"{_fmt(m['flip_wrong_to_correct'], pct=True)} wrong→correct; McNemar p = "
                     + ("-" if p is None else f"{p:.3g}"))
    return ["flips by direction (McNemar's exact test on the paired verdicts; rows are the pairs):", *lines] \
        if lines else []


def _thinking_lines(models: list[dict]) -> list[str]:
    """Reasoning models: thinking and answer lengths against the original's, and unfinished thinking."""
    lines = []
    for s in models:
        m = s["metrics"] or {}
        if (m.get("thinking_length_ratio") or {}).get("value") is None:
            continue
        lines.append(f"  {s['name']}: thinking {_fmt(m['thinking_length_ratio'], digits=3)}×, answer "
                     f"{_fmt(m['answer_length_ratio'], digits=3)}×; thinking unfinished (cut by max_tokens) "
                     f"{_fmt(m['unfinished_thinking_original'], pct=True)} original, "
                     f"{_fmt(m['unfinished_thinking_cousin'], pct=True)} cousin")
        if (m.get("kld_thinking") or {}).get("value") is not None:
            lines.append(f"    KLD in the original's thinking {_fmt(m['kld_thinking'], digits=3)}, in its answer "
                         f"{_fmt(m.get('kld_answer') or {}, digits=3)}; same top-1 "
                         f"{_fmt(m['same_top1_thinking'], pct=True)} / {_fmt(m.get('same_top1_answer') or {}, pct=True)}")
    return ["thinking apart from the answer (cousin tokens / original tokens, [CI] over prompts):", *lines] \
        if lines else []


def _choice_lines(models: list[dict]) -> list[str]:
    """Multiple choice by likelihood: acc and acc_norm of both, flips with McNemar's p, option KL and
    its rank correlation with flips over prompts, flips by the original's top margin."""
    lines = []
    for s in models:
        m = s["metrics"] or {}
        if (m.get("option_kl_mean") or {}).get("value") is None:
            continue
        line = f"  {s['name']}: option KL {_fmt(m['option_kl_mean'], digits=3)}"
        if (m.get("mc_acc_original") or {}).get("value") is not None:
            p = (m.get("mc_flip_mcnemar_p") or {}).get("value")
            line += (f"; acc {_fmt(m['mc_acc_original'], pct=True)} -> {_fmt(m['mc_acc_cousin'], pct=True)}, "
                     f"acc_norm {_fmt({'value': m['mc_acc_norm_original']['value']}, pct=True)} -> "
                     f"{_fmt({'value': m['mc_acc_norm_cousin']['value']}, pct=True)}; flips "
                     f"{_fmt(m['mc_flip_rate'], pct=True)} (McNemar p {'-' if p is None else f'{p:.3g}'})")
        rho = m.get("option_kl_flip_spearman") or {}
        if rho.get("value") is not None:
            line += f"; Spearman(option KL, flips) {rho['value']:.2f} (p {rho['p']:.2g}, {rho['prompts']} prompts)"
        lines.append(line)
        bins = (s.get("slices") or {}).get("option_margin") or {}
        if any((b.get("flip_rate") or {}).get("value") is not None for b in bins.values()):
            lines.append("    flips by the original's top margin: " + ", ".join(
                f"{label} {_fmt({'value': b['flip_rate']['value']}, pct=True)} of {b['prompts']}"
                for label, b in bins.items() if b["prompts"]))
    return ["multiple choice by likelihood (options' log-likelihoods; KL over the options, original -> cousin):",
            *lines] if lines else []


def _notes(summary: dict) -> list[str]:
    """What a figure left out ("-") or a point interval means, said rather than left to be read as zero."""
    notes = []
    measured = [s["metrics"] or {} for s in summary["cousins"] if s["error"] is None or s["metrics"]]
    if summary["prompts"] < 2:
        notes.append(f"note: {summary['prompts']} prompt(s): a bootstrap over fewer than two prompts has no spread, "
                     f"so each [CI] is a point, not an uncertainty")
    unparsed = {s["name"]: [(s["metrics"].get(f"unparsed_answers_{side}") or {}).get("value") or 0
                            for side in ("original", "cousin")] for s in summary["cousins"] if s["metrics"]}
    for name, (o, c) in unparsed.items():
        if o or c:
            notes.append(f"note: {name}: math-verify could not parse {int(o)} of the original's and {int(c)} of the "
                         f"cousin's final answers: judged not correct")

    def absent(key: str) -> bool:
        return all(not m or (key in m and (m[key] or {}).get("value") is None) for m in measured)

    if measured and absent("kld_mean"):
        notes.append("note: no token was compared (every generation or score is an error row: see the run's "
                     "error rows); the drift figures are '-', not zero")
    elif measured and absent("flip_rate"):
        notes.append("note: flips and acc delta are '-': no compared prompt has a reference answer (label prompts "
                     "through corpus.fields.reference to measure them)")
    return notes
