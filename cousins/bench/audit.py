"""The audit's calibration and power on the tiny family, against vLLM's own server:

    python -m cousins.bench.audit [--family tiny|realistic] [--budget 2000] [--cousins rtn-int8,…] [--shares 0.5,0.2]

1. False positives: the served teacher audited against the local teacher at `--budget`; every
   disjoint group of prompts is an audit of its own (the A/A pair: the reference against itself;
   the target pair: the same weights behind the server), so G groups give G audits' verdicts.
2. Power: for each cousin, an audit of the served teacher with the cousin as the reference (H0 is
   symmetric: the same question as the cousin behind the server, one server for all). The same
   run's tests are recomputed on G groups for several G: the share of groups rejected is the power
   at budget/G queries; the queries each test needs for >= 90% power at alpha 0.05 are read there.
3. A mixture: a proxy (`Mixer`) sends a share of the requests to a server running an int4 cousin
   (rtn-int4, or the realistic family's llmc-w4a16) and the rest to the teacher's: the audit at
   `audit.budget`'s default, per share.

Prints a table per part and writes the figures as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
GROUPS = (40, 20, 10, 5, 2, 1)
# Per family: the teacher, its model preset, and each cousin (its directory under models/, and
# the overrides its reference engine needs); the mixture's cousin.
FAMILIES = {
    "tiny": {"teacher": "tiny-teacher", "preset": "tiny-teacher", "mix": "rtn-int4", "cousins": {
        "rtn-int8": ("tiny-teacher-rtn-int8", ()), "rtn-int4": ("tiny-teacher-rtn-int4", ()),
        "w8a8-int8": ("tiny-teacher-w8a8-int8", ()), "fp8-dynamic": ("tiny-teacher-fp8-dynamic", ()),
        "student-kd": ("tiny-student-kd", ())}},
    "realistic": {"teacher": "realistic-teacher", "preset": "realistic-teacher", "mix": "llmc-w4a16", "cousins": {
        "llmc-w8a8-int8": ("realistic-teacher-llmc-w8a8-int8", ()),
        "llmc-fp8-dynamic": ("realistic-teacher-llmc-fp8-dynamic", ()),
        # vLLM's CPU int4 kernel takes bfloat16 only: these references differ from the float32
        # server by their dtype too, as their drift does (conf/cousins/realistic.yaml)
        "llmc-w4a16": ("realistic-teacher-llmc-w4a16", ("model.dtype=bfloat16",)),
        "llmc-gptq-w4a16": ("realistic-teacher-llmc-gptq-w4a16", ("model.dtype=bfloat16",)),
        "llmc-awq-w4a16": ("realistic-teacher-llmc-awq-w4a16", ("model.dtype=bfloat16",)),
        "student": ("realistic-student", ())}},
}


def build_family(family: str) -> None:
    """The family's teacher and cousins, built where absent (as the drift job builds them)."""
    from hydra import compose, initialize_config_dir

    from cousins.contract.config import resolve_paths, to_config
    from cousins.family.builds import ensure_model
    from cousins.family.prepare import build_quantized_cousins

    preset = FAMILIES[family]["preset"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        d = compose(config_name="drift",
                    overrides=[f"model={preset}", f"cousins={'demo' if family == 'tiny' else family}"])
    cfg = resolve_paths(to_config(d), str(ROOT))
    ensure_model(cfg.model.path, cfg.model.build, cfg.model.seed)
    build_quantized_cousins(cfg)


class Mixer:
    """A proxy on 127.0.0.1 sending a completion request to `other` (a server that serves its
    model as "other") when a hash of its body falls below `share`, else to `main`: the same
    request always goes the same way, retries included. Model lists come from `main`."""

    def __init__(self, main: str, other: str, share: float):
        import httpx

        mixer = self
        self.sent = {"main": 0, "other": 0}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, r) -> None:
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_GET(self):
                self._answer(httpx.get(main + self.path[len("/v1"):], timeout=120))

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                to_other = int.from_bytes(hashlib.sha256(body).digest()[:8], "big") / 2 ** 64 < share
                mixer.sent["other" if to_other else "main"] += 1
                if to_other:
                    body = json.dumps({**json.loads(body), "model": "other"}).encode()
                self._answer(httpx.post((other if to_other else main) + self.path[len("/v1"):], content=body,
                                        headers={"Content-Type": "application/json"}, timeout=120))

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/v1"

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def _config(reference: str, url: str, model: str, root: str, run_id: str, *overrides: str,
            preset: str = "tiny-teacher"):
    from hydra import compose, initialize_config_dir

    import cousins.contract.audit_config as ac
    from cousins.contract.config import resolve_paths, to_config
    from cousins.contract.validate import validate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        d = compose(config_name="audit", overrides=[
            f"model={preset}", f"model.path={reference}", "model.build=null", f"storage.root={root}",
            f"run.run_id={run_id}", f"endpoint.url={url}",
            f"endpoint.model={model}", "engine.max_model_len=256", *overrides])
    cfg = ac.as_run_config(resolve_paths(ac.typed_audit(to_config(d), [])))
    validate(cfg)
    return cfg


def _committed(cfg):
    from cousins.run.lifecycle import committed
    from cousins.run.storage import resolve

    return committed(resolve(cfg.storage.root), cfg.run.run_id)


def power(cfg, groups=GROUPS) -> list[dict]:
    """The committed audit's tests recomputed on G disjoint groups for each G: per G the queries
    per group and the share of groups each test (and the verdict) rejects, for the target pair and
    the A/A pair."""
    from cousins.audit.run import calibration, merged_tests
    from cousins.contract.audit_config import TARGET
    from cousins.run.layout import count_rows

    run = _committed(cfg)
    prompts = count_rows(run.layout.prompts)
    out = []
    for g in groups:
        _, by_group = merged_tests(cfg, run, prompts, groups=g)
        row = {"groups": g, "queries": prompts * cfg.run.samples // g}
        for pair, name in ((TARGET, "target"), ("a/a", "a_a")):
            c = calibration(by_group.get(pair, {}), alpha=cfg.audit.alpha, seed=cfg.audit.seed, level=0.95)
            row[name] = {"verdict": c["false_positive_rate"], "ci": c["ci"],
                         **{t: v["rejected"] / v["groups"] for t, v in c["per_test"].items()}}
        out.append(row)
    return out


def recomputed(cfg) -> dict:
    """A committed audit's result from its stored generations, with this code's tests (no request)."""
    from cousins.audit.run import audit_result, merged_tests

    run = _committed(cfg)
    stored = json.loads(run.layout.audit.read_text())
    a = cfg.audit
    pairs, groups = merged_tests(cfg, run, stored["prompts"])
    return {**stored, **audit_result(pairs, groups, alpha=a.alpha, seed=a.seed, resamples=a.resamples,
                                     level=a.confidence)}


def package_comparison(cfg, prompts: int = 50, permutations: int = 200) -> dict | None:
    """The text test against the `model-equality-testing` package's (Gao et al.'s code) on the
    same samples: the audit's first `prompts` prompts, each completion's first compare_chars
    characters (as code points, padded), the target against the reference. None when the package
    is not installed (it is not a dependency: `pip install model-equality-testing`)."""
    try:
        from model_equality_testing.algorithm import run_two_sample_test
        from model_equality_testing.distribution import CompletionSample
    except ImportError:
        return None
    import numpy as np
    import pyarrow.compute as pc

    from cousins.audit import stats
    from cousins.contract.audit_config import TARGET

    run, length = _committed(cfg), cfg.audit.compare_chars
    sides = {}
    for name in (cfg.model.name, TARGET):
        t = run.read(run.layout.generations(name), ["prompt_id", "output_text", "error"])
        sides[name] = t.filter(pc.is_null(t.column("error")))
    ids = sorted(set(sides[TARGET].column("prompt_id").to_pylist()))[:prompts]
    index = {p: i for i, p in enumerate(ids)}
    texts = {name: {p: [] for p in ids} for name in sides}
    for name, t in sides.items():
        for p, text in zip(t.column("prompt_id").to_pylist(), t.column("output_text").to_pylist()):
            if p in index:
                texts[name][p].append(text or "")

    def sample(name: str):
        rows = [(index[p], text) for p in ids for text in texts[name][p]]
        codes = np.full((len(rows), length), -1, dtype=np.int64)
        for i, (_, text) in enumerate(rows):
            codes[i, :len(text[:length])] = [ord(c) for c in text[:length]]
        return CompletionSample(prompts=np.array([r[0] for r in rows]), completions=codes, m=len(ids))

    theirs_p, theirs_stat = run_two_sample_test(sample(cfg.model.name), sample(TARGET), stat_type="mmd_hamming",
                                                b=permutations)
    ours = stats.mmd_test(texts[cfg.model.name], texts[TARGET], length=length, permutations=permutations, seed=0,
                          resamples=10)
    return {"prompts": len(ids), "permutations": permutations, "ours": {"statistic": ours.statistic,
            "p_value": ours.p_value}, "package": {"statistic": float(theirs_stat), "p_value": theirs_p}}


def needed(rows: list[dict], test: str, goal: float = 0.9) -> int | None:
    """The fewest queries at which `test` (or "verdict") rejected in >= goal of the groups."""
    ok = [r["queries"] for r in rows if (r["target"].get(test) or 0) >= goal]
    return min(ok) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=2000)
    ap.add_argument("--family", default="tiny", choices=sorted(FAMILIES))
    ap.add_argument("--cousins", help="comma-separated (default: the family's every cousin)")
    ap.add_argument("--shares", default="0.5,0.2,0.1")
    ap.add_argument("--out", default="audit-benchmark.json")
    ap.add_argument("--recompute", help="a directory an earlier run of this benchmark left: its audits' tests "
                    "recomputed from their stored samples (no server, no engine)")
    args = ap.parse_args()

    from cousins.audit.report import table
    from cousins.audit.run import run_audit
    from cousins.bench.vllm_server import VllmServer
    from cousins.contract.config import LogConfig, RayConfig
    from cousins.run.runtime import init_ray

    models = ROOT / "models"
    fam = FAMILIES[args.family]
    cousins = fam["cousins"] if args.cousins is None else {c: fam["cousins"][c] for c in args.cousins.split(",") if c}
    work = Path(args.recompute or tempfile.mkdtemp(prefix="cousins-audit-bench-"))
    servers = {}
    if not args.recompute:
        build_family(args.family)
        servers["teacher"] = VllmServer(str(models / fam["teacher"]), "teacher", work / "teacher.log")
        if args.shares:
            mixed, dtype = fam["cousins"][fam["mix"]]
            servers["int4"] = VllmServer(str(models / mixed), "other", work / "int4.log",
                                         dtype="bfloat16" if dtype else "float32")
    url = {name: s.url for name, s in servers.items()}
    figures: dict = {"family": args.family, "mix": fam["mix"], "budget": args.budget, "groups": list(GROUPS)}

    def audit(reference: str, target_url: str | None, run_id: str, *overrides: str) -> tuple[dict, object]:
        cfg = _config(str(models / reference), target_url or "http://127.0.0.1:9/v1", "teacher",
                      str(work / "out"), run_id, *overrides, preset=fam["preset"])
        result = recomputed(cfg) if args.recompute else run_audit(cfg)
        return result, cfg

    try:
        for s in servers.values():
            s.wait()
        init_ray(RayConfig(), LogConfig())
        budget = f"audit.budget={args.budget}"
        result, cfg = audit(fam["teacher"], url.get("teacher"), "served-original", budget)
        figures["original"] = {"audit": result, "power": power(cfg), "package": package_comparison(cfg)}
        print(table(result), flush=True)
        figures["cousins"] = {}
        for name, (path, overrides) in cousins.items():
            result, cfg = audit(path, url.get("teacher"), f"cousin-{name}", budget, *overrides)
            rows = power(cfg)
            figures["cousins"][name] = {"audit": result, "power": rows, "package": package_comparison(cfg),
                                        "queries_for_90pct": {t: needed(rows, t) for t in
                                                              ("verdict", "mmd_hamming", "topk_logprobs", "mcnemar")}}
            print(table(result), json.dumps(figures["cousins"][name]["queries_for_90pct"]), sep="\n", flush=True)
        figures["mixtures"] = {}
        for share in [float(x) for x in args.shares.split(",") if x]:
            mixer = None if args.recompute else Mixer(url["teacher"], url["int4"], share)
            try:
                result, mix_cfg = audit(fam["teacher"], mixer and mixer.url, f"mix-{share:g}")
            finally:
                mixer and mixer.stop()
            figures["mixtures"][f"{share:g}"] = {"audit": result, "sent": mixer and mixer.sent,
                                                 "package": package_comparison(mix_cfg)}
            print(f"share {share:g} to {fam['mix']}:", table(result), sep="\n", flush=True)
    finally:
        for s in servers.values():
            s.stop()
        Path(args.out).write_text(json.dumps(figures, indent=1, default=str))
    _print_summary(figures)


def _print_summary(f: dict) -> None:
    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    print("\nfalse positives per group (served original; A/A = the reference against itself):")
    for r in f["original"]["power"]:
        print(f"  G={r['groups']:>2} ({r['queries']:>5} queries each): target {pct(r['target']['verdict'])}, "
              f"A/A {pct(r['a_a']['verdict'])}")
    print("\nthe text test against model-equality-testing's on the same samples (statistic, p):")
    for name, c in [("original", f["original"]), *f.get("cousins", {}).items(), *f.get("mixtures", {}).items()]:
        m = c.get("package")
        if m:
            print(f"  {name:<12} ours {m['ours']['statistic']:.6f} p {m['ours']['p_value']:.3f}; package "
                  f"{m['package']['statistic']:.6f} p {m['package']['p_value']:.3f} ({m['prompts']} prompts)")
    print("\nqueries for >= 90% power at alpha 0.05 (None: not within the budget):")
    for name, c in f.get("cousins", {}).items():
        print(f"  {name:<12} {json.dumps(c['queries_for_90pct'])}  verdict at {f['budget']}: {c['audit']['verdict']}")
    for share, m in f.get("mixtures", {}).items():
        ps = ", ".join(f"{t['name']} {t['p_value']:.3g}" for t in m["audit"]["tests"])
        print(f"  mixture {share} to {f['mix']}: {m['audit']['verdict']} (p: {ps}; requests {m['sent']})")


if __name__ == "__main__":
    main()
