"""The audit as a run: is the target endpoint serving the reference's output distribution?

    reference (model, or audit.reference_endpoint)  seeds base+0   \
    target (the endpoint)                            seeds base+2   |- generations, one stage each
    noise floor (the reference again, reordered)     seeds base+1   /
    tests: target vs reference, and the A/A (noise floor vs reference), overall and per group
    -> audit.json, report.html, manifest.json (committed last)

The target goes first: an endpoint that answers nothing ends the audit before any local engine
starts. Each test (cousins/audit/stats.py) runs where the target exposed what it needs: the MMD
test on sampled texts always, the top-k log-probability test when the target's rows carry top-k
lists, McNemar on labelled prompts. The verdict is Holm's correction across the tests that ran at
audit.alpha. The A/A is the same tests on the reference against itself, on all prompts and on
`calibration_groups` disjoint groups of them: the share of groups whose A/A verdict is `differs`
is the audit's own measured false-positive rate.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from cousins.audit import stats
from cousins.audit.partition import AA, Settings, audit_parts
from cousins.audit.report import report_html
from cousins.contract.audit_config import TARGET, AuditJobConfig
from cousins.contract.audit_record import Audit
from cousins.contract.codec import decode, encode
from cousins.contract.records import NOISE_FLOOR
from cousins.drift.answers import Rule
from cousins.drift.plane import wilson
from cousins.engine import hosts, plan
from cousins.orchestrate.manifest import manifest
from cousins.orchestrate.pipeline import check_engines_fit, generate_model, open_run, run_prompts, run_result
from cousins.run.lifecycle import Run, RunState

SEED_OFFSETS = {"reference": 0, NOISE_FLOOR: 1, TARGET: 2}  # each side's samples from its own seeds
PROMPTS_PER_PARTITION = 256
NAMES = {f"cousins.{TARGET}.endpoint": "endpoint"}  # the run's key of the target -> the audit config's


class AuditError(RuntimeError):
    """The audit cannot give a verdict (the target answered nothing usable)."""


@dataclasses.dataclass
class _Acc:
    """One pair's (or one group's) parts, merged."""

    permutations: int
    # each partition's per-prompt figures, as arrays (8 bytes a number, whatever the run's size)
    mmd_own: list = dataclasses.field(default_factory=list)
    lp_own: list = dataclasses.field(default_factory=list)
    mc_own: list = dataclasses.field(default_factory=list)
    mmd_null: np.ndarray | float = 0.0  # the permutations' sums
    lp_null: np.ndarray | float = 0.0
    mmd_queries: int = 0
    lp_queries: int = 0

    def add(self, row: dict) -> None:
        self.mmd_own.append(np.asarray(row["mmd_own"], dtype=float))
        self.lp_own.append(np.asarray(row["lp_own"], dtype=float))
        self.mc_own.append(np.asarray(row["mc_own"], dtype=np.int64))
        self.mmd_null = self.mmd_null + np.asarray(row["mmd_null"]).reshape(self.permutations, 3)
        self.lp_null = self.lp_null + np.asarray(row["lp_null"])
        self.mmd_queries += row["mmd_queries"]
        self.lp_queries += row["lp_queries"]

    def tests(self, *, seed: int, resamples: int, level: float) -> list[stats.TestResult]:
        """The tests this pair's samples allow (a test with nothing to compare is left out)."""
        rng = np.random.default_rng(seed)
        mmd, lp, mc = (np.concatenate(x) if x else np.zeros(0) for x in (self.mmd_own, self.lp_own, self.mc_own))
        out = []
        if mmd.size:
            out.append(stats.mmd_result(mmd.reshape(-1, 6), self.mmd_null, self.mmd_queries, rng=rng,
                                        resamples=resamples, level=level))
        if lp.size:
            out.append(stats.logprob_result(lp, self.lp_null, self.lp_queries, rng=rng, resamples=resamples,
                                            level=level))
        if mc.size:
            out.append(stats.mcnemar_result(mc.reshape(-1, 3), rng=rng, resamples=resamples, level=level))
        return out


def merge(parts, permutations: int) -> tuple[dict[str, _Acc], dict[str, dict[int, _Acc]]]:
    """The partitions' parts merged per pair (all prompts), and per pair and group."""
    pairs: dict[str, _Acc] = {}
    groups: dict[str, dict[int, _Acc]] = {}
    for batch in parts:
        for row in batch.to_pylist():
            pairs.setdefault(row["pair"], _Acc(permutations)).add(row)
            groups.setdefault(row["pair"], {}).setdefault(row["group"], _Acc(permutations)).add(row)
    return pairs, groups


def _test_json(r: stats.TestResult) -> dict:
    def num(x):
        return None if x is None or not np.isfinite(x) else float(x)

    return {"name": r.name, "statistic": num(r.statistic), "p_value": num(r.p_value), "reject": r.reject,
            "effect_ci": None if r.effect_ci is None else [num(x) for x in r.effect_ci],
            "null_mean": num(r.null_mean), "queries": r.queries}


def calibration(groups: dict[int, _Acc], *, alpha: float, seed: int, level: float) -> dict:
    """The verdict on each disjoint group of prompts: for the A/A pair, the measured false-positive
    rate (for the target's, the power at the group's size), with its Wilson interval, overall
    and per test."""
    verdicts, per_test = [], {}
    for g in sorted(groups):
        tests = groups[g].tests(seed=seed + g, resamples=10, level=level)  # (their CIs are not reported)
        if not any(t.p_value is not None for t in tests):
            continue
        verdicts.append(stats.verdict(tests, alpha) == "differs")
        for t in tests:
            if t.p_value is not None:
                per_test.setdefault(t.name, []).append(t.p_value <= alpha)
    n, k = len(verdicts), sum(verdicts)
    rate = k / n if n else None
    return {"groups": n, "false_positives": k, "false_positive_rate": rate,
            "ci": list(wilson(rate, n, level)) if n else None,
            "per_test": {name: {"groups": len(v), "rejected": int(sum(v))} for name, v in per_test.items()}}


def audit_result(pairs: dict[str, _Acc], groups: dict[str, dict[int, _Acc]], *, alpha: float, seed: int, resamples: int,
                 level: float) -> dict:
    """The verdict, the tests, and the A/A calibration, from the merged parts."""
    target = pairs.get(TARGET)
    tests = target.tests(seed=seed, resamples=resamples, level=level) if target else []
    if not any(t.p_value is not None for t in tests):
        raise AuditError("no test could compare the target with the reference (no prompt with two usable "
                         "samples on both sides)")
    aa = pairs[AA].tests(seed=seed, resamples=resamples, level=level) if AA in pairs else []
    aa_verdict = stats.verdict(aa, alpha) if aa else None
    return {"verdict": stats.verdict(tests, alpha), "alpha": alpha, "correction": "holm",
            "tests": [_test_json(t) for t in tests],
            "a_a": {"verdict": aa_verdict, "tests": [_test_json(t) for t in aa],
                    **calibration(groups.get(AA, {}), alpha=alpha, seed=seed, level=level)}}


def _check_target(run: Run, stats_target) -> None:
    if stats_target.rows and stats_target.error_rows == stats_target.rows:
        from cousins.run.layout import read_batches

        first = next((e for b in read_batches(run.layout.generations(TARGET), ["error"])
                      for e in b.column(0).to_pylist() if e), "no rows")
        raise AuditError(f"the target answered none of its {stats_target.rows} requests (the first error: {first}); "
                         f"they are kept as error rows: audit again under another run.run_id once it answers")


def merged_tests(cfg: AuditJobConfig, run: Run, n_prompts: int, *, groups: int | None = None):
    """Every test's parts of `run`'s generations, merged per pair and per (pair, group) (`merge`);
    `groups`: calibration groups other than audit.calibration_groups (the benchmark's power curve)."""
    a = cfg.audit
    settings = Settings(reference=cfg.model.name, target=TARGET, noise=NOISE_FLOOR, compare_chars=a.compare_chars,
                        permutations=a.permutations, tolerance=a.logprob_tolerance,
                        groups=groups or a.calibration_groups, seed=a.seed, rule=Rule.of_config(cfg))
    partitions = max(1, -(-n_prompts // PROMPTS_PER_PARTITION))
    return merge(audit_parts(run, settings, partitions=partitions), a.permutations)


def run_audit(cfg: AuditJobConfig, run: Run | None = None, *, backend=None) -> dict:
    """Run (or resume) the audit of `cfg` (`as_run_config`'s, validated, paths resolved) on the
    connected Ray; returns audit.json's content (a committed run's, read back)."""
    run = run or open_run(cfg)
    if run.state is RunState.COMMITTED:
        return json.loads(run.layout.audit.read_text())
    check_engines_fit(cfg)
    print(f"audit {run.run_id} ({'resuming' if run.state is RunState.RESUME else 'new'}) at {run.url}", flush=True)
    prompts, n_prompts, n_errors = run_prompts(cfg, run)
    reference, target, noise = plan.model_entries(cfg, noise_floor=True)
    base = cfg.run.sampling.seed
    done = {}
    with hosts.hosted(cfg.engine.keep_processes):  # the reference's engine process serves its noise floor too
        for e, offset in ((target, SEED_OFFSETS[TARGET]), (reference, SEED_OFFSETS["reference"]),
                          (noise, SEED_OFFSETS[NOISE_FLOOR])):
            done[e.name] = generate_model(cfg, run, prompts, n_prompts, e, backend, seed=base + offset)
            if e is target:
                _check_target(run, done[e.name])
    a = cfg.audit
    pairs, groups = merged_tests(cfg, run, n_prompts)
    out = audit_result(pairs, groups, alpha=a.alpha, seed=a.seed, resamples=a.resamples, level=a.confidence)
    t = done[target.name]
    out = {"run_id": run.run_id, **out,
           "reference": {"name": reference.name, "path": reference.path, "endpoint": reference.endpoint},
           "target": {"name": target.name, "endpoint": target.endpoint},
           "prompts": n_prompts, "samples": cfg.run.samples, "budget": a.budget,
           "spent": {"requests": t.rows, "error_rows": t.error_rows, "prompt_tokens": t.prompt_tokens,
                     "output_tokens": t.output_tokens},
           "notes": notes(cfg)}
    out = encode(decode(Audit, encode(out), f"{run.url}/audit.json"))  # written as its declaration reads it
    run.layout.audit.write_text_atomic(json.dumps(out, indent=1, allow_nan=False))
    run.layout.report.write_text_atomic(report_html(out))
    result = run_result(run, n_prompts, n_errors, [done[e.name] for e in (reference, target, noise)])
    run.commit(manifest(cfg, run, result, [reference, target, noise],
                        stages={"audit.json": "done", "report.html": "done"}))
    return out


def notes(cfg: AuditJobConfig) -> list[str]:
    """What the reader of the verdict should know about how it was measured."""
    out = []
    if cfg.endpoint.api == "chat":
        out.append("api chat: the server renders the prompts with its own template, so a template that differs "
                   "from the reference's is part of what is measured")
    if cfg.audit.logprob_tolerance > 0:
        out.append(f"top-k test: mean log-probability differences below {cfg.audit.logprob_tolerance:g} nats "
                   f"are not counted (the engines' own numerics)")
    return out


def config_of(dcfg) -> tuple[AuditJobConfig, list[str]]:
    """The audit job's composed config as the run it is (`as_run_config`), local paths absolute,
    and the audit block's problems (jobkit.start reports them with the run's own, at once)."""
    import sys

    from cousins.contract.audit_config import as_run_config, problems, typed_audit
    from cousins.contract.config import ConfigError, resolve_paths, to_config

    try:
        cfg = to_config(dcfg)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    found: list[str] = []
    cfg = resolve_paths(typed_audit(cfg, found))
    return as_run_config(cfg), found + problems(cfg)
