"""The audit's tests as a Ray Data computation: the prompts and the three models' generations (the
reference, the target, the noise floor) meet by prompt in one worker, which computes each prompt's
part of every test for two pairs, the target against the reference and the noise floor against
the reference (the A/A), and returns them summed per (pair, calibration group). The driver gets a
few numbers per prompt (each test's own statistic, for the CIs) and the permutations' sums.

Every prompt's permutations are drawn from a generator seeded by (seed, pair, prompt id): the
result does not depend on how the prompts were partitioned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cousins.audit import stats
from cousins.drift.answers import Rule
from cousins.run.layout import partition_name, read_rows
from cousins.contract import schema

AA = "a/a"  # the pair of the noise floor against the reference
GEN_COLUMNS = ["prompt_id", "sample_index", "output_text", "topk_token_ids", "topk_logprobs", "answer_offset", "error"]
PROMPT_COLUMNS = ["prompt_id", "reference", "choices", "checker"]
_G = {f.name: f.type for f in schema.GENERATIONS}
_P = {f.name: f.type for f in schema.PROMPTS}
UNION = pa.schema([("model", pa.string()), ("part", pa.string()),
                   *[(c, _G[c]) for c in GEN_COLUMNS], *[(c, _P[c]) for c in PROMPT_COLUMNS[1:]]])
PARTS = pa.schema([
    ("pair", pa.string()), ("group", pa.int32()),
    ("mmd_own", pa.list_(pa.float64())),  # [prompts x 6]: kernel sums and pair counts (stats.mmd_prompt)
    ("mmd_null", pa.list_(pa.float64())),  # [permutations x 3], summed over the prompts
    ("mmd_queries", pa.int64()),
    ("lp_own", pa.list_(pa.float64())),  # [prompts]: each prompt's distance (stats.logprob_prompt)
    ("lp_null", pa.list_(pa.float64())),  # [permutations], summed over the prompts
    ("lp_queries", pa.int64()),
    # [prompts x 3]: each labelled prompt's correct->wrong and wrong->correct pairs, and its pairs
    # (sample i of one side with sample i of the other: every sample index both answered)
    ("mc_own", pa.list_(pa.int64())),
])


@dataclass(frozen=True)
class Settings:
    reference: str  # the models' names in the run
    target: str
    noise: str
    compare_chars: int
    permutations: int
    tolerance: float
    groups: int
    seed: int
    rule: Rule


def group_of(prompt_id: str, groups: int) -> int:
    """A prompt's calibration group: stable across runs, partitions and Python processes."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") % groups


def _rng(seed: int, pair: str, prompt_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{pair}:{prompt_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def _tag(table: pa.Table, path: str, *, part: str) -> pa.Table:
    """A stage's rows in the union's shape; of the top-k lists only the first position's (all the
    tests read: a long output's lists are not shuffled for nothing)."""
    n = table.num_rows
    for c in ("topk_token_ids", "topk_logprobs"):
        if c in table.column_names:
            table = table.set_column(table.column_names.index(c), c, pc.list_slice(table.column(c), 0, 1))
    cols = {"model": pa.array([partition_name(path) if part == "gen" else None] * n, pa.string()),
            "part": pa.array([part] * n, pa.string())}
    return pa.table({f.name: cols[f.name] if f.name in cols else
                     (table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type))
                     for f in UNION}, schema=UNION)


class _Side:
    """One model's answered samples of each prompt: their texts, first positions' top-k, final answers."""

    def __init__(self, rows: list[dict]):
        self.texts: dict[str, list[str]] = {}
        self.first: dict[str, list[dict[int, float]]] = {}
        self.answers: dict[str, dict[int, str]] = {}  # prompt -> sample index -> its final answer
        for r in rows:
            if r["error"] is not None:
                continue
            p, text = r["prompt_id"], r["output_text"] or ""
            self.texts.setdefault(p, []).append(text)
            ids, lps = r["topk_token_ids"], r["topk_logprobs"]
            if ids and lps and ids[0]:
                self.first.setdefault(p, []).append(dict(zip(ids[0], lps[0])))
            self.answers.setdefault(p, {})[r["sample_index"]] = (
                text[r["answer_offset"]:] if r["answer_offset"] is not None else text)


def _pair_parts(ref: _Side, other: _Side, prompts: dict[str, dict], pair: str, s: Settings) -> list[dict]:
    out: dict[int, dict] = {}
    for p in sorted(set(ref.texts) | set(other.texts)):
        g = out.setdefault(group_of(p, s.groups), {
            "mmd_own": [], "mmd_null": np.zeros((s.permutations, 3)), "mmd_queries": 0, "lp_own": [],
            "lp_null": np.zeros(s.permutations), "lp_queries": 0, "mc_own": []})
        rng = _rng(s.seed, pair, p)
        a, b = ref.texts.get(p, []), other.texts.get(p, [])
        if len(a) >= 2 and len(b) >= 2:
            own, null = stats.mmd_prompt(a, b, length=s.compare_chars, permutations=s.permutations, rng=rng)
            g["mmd_own"].append(own)
            g["mmd_null"] += null
            g["mmd_queries"] += len(a) + len(b)
        fa, fb = ref.first.get(p, []), other.first.get(p, [])
        if fa and fb:
            own, null = stats.logprob_prompt(fa, fb, permutations=s.permutations, rng=rng, tolerance=s.tolerance)
            g["lp_own"].append(own)
            g["lp_null"] += null
            g["lp_queries"] += len(fa) + len(fb)
        row = prompts.get(p)
        if row and row["reference"] is not None:
            a, b = ref.answers.get(p, {}), other.answers.get(p, {})
            counts = [0, 0, 0]
            for i in sorted(set(a) & set(b)):
                judge = [s.rule.correct(x[i], row["reference"], row["choices"], row["checker"]) for x in (a, b)]
                if None not in judge:
                    counts[0] += judge[0] and not judge[1]
                    counts[1] += judge[1] and not judge[0]
                    counts[2] += 1
            if counts[2]:
                g["mc_own"] += counts
    return [{"pair": pair, "group": k, "mmd_own": np.asarray(v["mmd_own"]).ravel().tolist(),
             "mmd_null": v["mmd_null"].ravel().tolist(), "lp_own": [float(x) for x in v["lp_own"]],
             "mmd_queries": int(v["mmd_queries"]), "lp_null": v["lp_null"].tolist(),
             "lp_queries": int(v["lp_queries"]),
             "mc_own": [int(x) for x in v["mc_own"]]}
            for k, v in sorted(out.items())]


def audit_partition(block: pa.Table, *, settings: Settings) -> pa.Table:
    """Every test's parts for the prompts of one partition, per (pair, group) (PARTS)."""
    s = settings
    gens = block.filter(pc.equal(block.column("part"), "gen"))
    prompts = {r["prompt_id"]: r for r in block.filter(pc.equal(block.column("part"), "prompt"))
               .select(PROMPT_COLUMNS).to_pylist()}
    sides = {name: _Side(gens.filter(pc.equal(gens.column("model"), name)).select(GEN_COLUMNS).to_pylist())
             for name in (s.reference, s.target, s.noise)}
    rows = (_pair_parts(sides[s.reference], sides[s.target], prompts, s.target, s)
            + _pair_parts(sides[s.reference], sides[s.noise], prompts, AA, s))
    return pa.Table.from_pylist(rows, schema=PARTS)


def audit_parts(run, settings: Settings, *, partitions: int, num_cpus: float = 1.0):
    """The parts of every partition of `run` (a committed audit's generations), streamed as the
    partitions finish (PARTS tables)."""
    from cousins.run.dataops import by_key, spread_blocks

    layout = run.layout
    gens = read_rows([layout.generations(n) for n in (settings.reference, settings.target, settings.noise)],
                     GEN_COLUMNS, tag=_tag, tag_kwargs={"part": "gen"}, schema=schema.GENERATIONS)
    prompts = read_rows([layout.prompts], PROMPT_COLUMNS, tag=_tag, tag_kwargs={"part": "prompt"},
                        schema=schema.PROMPTS)
    union = gens.union(prompts) if prompts is not None else gens
    return spread_blocks(by_key(union, "prompt_id", partitions), audit_partition, num_cpus=num_cpus,
                         fn_kwargs={"settings": settings})
