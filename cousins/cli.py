"""`cousins` console script: thin wrappers over the library and the jobs.

    cousins models build [--out models/tiny-teacher] [--seed 0]
    cousins generate [hydra overrides…]      # runs jobs/generate.py from this checkout
    cousins drift [hydra overrides…]         # runs jobs/drift.py (the original against its cousins)
    cousins export run_id=RUN [kd=true] …    # runs jobs/export.py: SFT/KD data from a committed run
    cousins audit endpoint.url=URL endpoint.model=NAME [audit.budget=N] …  # jobs/audit.py: is it the original?
    cousins corpus demo [--out PATH]         # (re)writes the bundled demo corpus
    cousins submit [--address URL] [--job generate] [--no-wait] [hydra overrides…]
    cousins status JOB_ID [--address URL]     # a submitted job's status; --logs for its logs
    cousins query runs|show RUN|config RUN|summary RUN|drift RUN|prompt RUN ID|report RUN [--root URL] [--json]
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: jobs/ and conf/ live beside the package


def _overrides(args: argparse.Namespace) -> list[str]:
    """The Hydra overrides after the command, without a leading '--' separator."""
    return args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides


def _models_build(args: argparse.Namespace) -> int:
    from cousins.family.builds import ensure_model
    from cousins.family.models import BUILD_REMEDY, RECIPES
    from cousins.run.removal import BUILD, NotOurs, remove_tree

    out = args.out or f"models/{args.recipe}"
    try:
        if args.force:  # --force rebuilds one of our builds, never a user's model
            remove_tree(out, BUILD, setting="--out", remedy=BUILD_REMEDY.format(setting="--out"))
        ensure_model(out, args.recipe, args.seed, setting="--out")
    except NotOurs as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from cousins.family import realistic

    print(f"{args.recipe}: {Path(out).resolve()}  ({RECIPES.get(args.recipe) or realistic.RECIPES[args.recipe]})")
    return 0


def _run_job(args: argparse.Namespace) -> int:
    job = ROOT / "jobs" / f"{args.command}.py"
    if not job.exists():
        print(f"error: {job} not found; `cousins {args.command}` runs from a checkout of the project",
              file=sys.stderr)
        return 2
    sys.argv = [str(job), *_overrides(args)]
    runpy.run_path(str(job), run_name="__main__")
    return 0


VERBOSE = "log.verbose=true (Ray's, Ray Data's and vLLM's own logs too)"
COMMON_OVERRIDES = {
    "generate": ["run.run_id=NAME (resume or name a run)", "corpus.path=FILE.jsonl corpus.limit=N",
                 "run.samples=N run.sampling.max_tokens=N run.sampling.logprobs=K",
                 "engine.num_actors=N engine.batch_size=N", "storage.root=s3://bucket/prefix",
                 "ray.address=ray://HEAD:10001", VERBOSE],
    "drift": ["cousins=none +cousins.NAME.path=DIR +cousins.NAME.kind=quantized|distilled|other",
              "drift.score_topk=K drift.bootstrap=N", "drift.recompute=true run.run_id=RUN",
              "storage.root=s3://bucket/prefix", "ray.address=ray://HEAD:10001", VERBOSE],
    "audit": ["endpoint.url=http://HOST:PORT/v1 endpoint.model=NAME (required)", "endpoint.api_key_env=VAR endpoint.api=chat",
              "model=NAME (the reference) audit.budget=N audit.alpha=0.05", "run.samples=N run.sampling.max_tokens=N",
              "run.run_id=NAME (resume or name a run)", "storage.root=s3://bucket/prefix", VERBOSE],
    "export": ["run_id=RUN (required)", "kd=true format=jsonl out=URL", "filters.answer_check=contains",
               "filters.near_dedup=true filters.best_of_n=mean_logprob", "storage.root=s3://bucket/prefix", VERBOSE],
}


def _job_help(job: str) -> str:
    """The Hydra config groups (with their choices) and the common overrides of a job."""
    lines = ["Hydra overrides: key=value, group=choice, +new.key=value; all keys: docs/configuration.md, docs/models.md.", ""]
    if job != "export":
        lines.append("config groups (group=choice):")
        for group in sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir()):
            if group.name == "cousins" and job in ("generate", "audit"):
                continue
            choices = sorted(f.stem for f in group.glob("*.yaml"))
            lines.append(f"  {group.name}: {', '.join(choices)}")
        lines.append("")
    lines.append("common overrides:")
    lines += [f"  {o}" for o in COMMON_OVERRIDES[job]]
    return "\n".join(lines)


def _corpus_demo(args: argparse.Namespace) -> int:
    from cousins.family.demo_corpus import DEMO_PATH, DISTILL_PATH, distill_records, write_demo_corpus
    from cousins.run.removal import NotOurs

    try:
        if args.distill:
            print(write_demo_corpus(args.out or DISTILL_PATH, distill_records()))
        else:
            print(write_demo_corpus(args.out or DEMO_PATH))
    except NotOurs as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _submit(args: argparse.Namespace) -> int:
    from cousins.orchestrate.submit import SubmitError, submit

    try:
        _, status = submit(args.job, _overrides(args), address=args.address, python=args.python,
                           wait=not args.no_wait)
    except (ValueError, FileNotFoundError, SubmitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if args.no_wait or status == "SUCCEEDED" else 1


def _status(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    if args.logs:
        print(client.get_job_logs(args.job_id), end="")
    print(f"job {args.job_id}: {str(client.get_job_status(args.job_id)).rsplit('.', 1)[-1]}")
    return 0


def _query(args: argparse.Namespace) -> int:
    import json
    import os

    from cousins.query import drift as qd
    from cousins.query import inputs as qi
    from cousins.query import prompt as qp
    from cousins.query import runs as q
    from cousins.query import render as qr
    from cousins.run.storage import resolve

    root = resolve(args.root or os.environ.get("COUSINS_STORAGE_ROOT") or "outputs")
    try:
        if args.what == "runs":
            data, text = q.list_runs(root, "all" if args.all else "committed"), qr.render_runs
        elif args.what == "show":
            data, text = q.get_run(root, args.run_id), qr.render_run
        elif args.what == "config":
            import yaml

            data, text = q.get_config(root, args.run_id), lambda d: yaml.safe_dump(d, sort_keys=False).rstrip()
        elif args.what == "summary":
            data = qd.get_summary(root, args.run_id, args.cousin)
            text = qr.render_cousin_summary if args.cousin else qr.render_summary
        elif args.what == "drift":
            if args.min_kld is not None and (args.min is not None or args.metric not in (None, "kld_mean")):
                raise qi.BadInput("--min-kld is --metric kld_mean --min X: give one or the other")
            data, text = qd.drift_page(
                root, args.run_id, cousin=args.cousin, category=args.category, metric=args.metric or "kld_mean",
                min_value=args.min if args.min_kld is None else args.min_kld, max_value=args.max,
                flips_only=args.flips_only,
                errors=args.errors, sort=args.sort, descending=not args.asc, limit=args.limit,
                offset=args.offset, fields=args.fields.split(",") if args.fields else None), qr.render_drift
        elif args.what == "prompt":
            data, text = qp.prompt_view(root, args.run_id, args.prompt_id, sample_index=args.sample), qr.render_prompt
        else:  # report
            html = q.get_report(root, args.run_id)
            if args.out:
                Path(args.out).write_bytes(html)
                print(f"{args.out}: {len(html)} bytes")
            else:
                sys.stdout.write(qr.terminal_safe(html.decode("utf-8")))
            return 0
    except qi.QueryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, qi.BadInput) else 1
    print(qr.json_safe(json.dumps(data, indent=2, ensure_ascii=False)) if args.json else qr.terminal_safe(text(data)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from cousins.query.inputs import DEFAULT_LIMIT
    from cousins.query.drift import METRICS, SORT_FIELDS
    from cousins.contract.recipes import MODEL_RECIPES, TINY_TEACHER

    parser = argparse.ArgumentParser(prog="cousins", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="tiny models built offline").add_subparsers(dest="action", required=True)
    build = models.add_parser("build", help="build a tiny model from its recipe (skipped if already built)")
    build.add_argument("recipe", nargs="?", default=TINY_TEACHER, choices=sorted(MODEL_RECIPES))
    build.add_argument("--out", help="directory to write (default: models/RECIPE)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(fn=_models_build)

    jobs_fmt = argparse.RawDescriptionHelpFormatter
    gen = sub.add_parser("generate", help="run jobs/generate.py with Hydra overrides", formatter_class=jobs_fmt,
                         epilog=_job_help("generate"))
    gen.add_argument("overrides", nargs=argparse.REMAINDER)
    gen.set_defaults(fn=_run_job)

    drift = sub.add_parser("drift", help="run jobs/drift.py with Hydra overrides", formatter_class=jobs_fmt,
                           epilog=_job_help("drift"))
    drift.add_argument("overrides", nargs=argparse.REMAINDER)
    drift.set_defaults(fn=_run_job)

    audit = sub.add_parser("audit", help="run jobs/audit.py: is an endpoint serving the original?",
                           formatter_class=jobs_fmt, epilog=_job_help("audit"))
    audit.add_argument("overrides", nargs=argparse.REMAINDER)
    audit.set_defaults(fn=_run_job)

    export = sub.add_parser("export", help="run jobs/export.py: SFT/KD data from a committed run",
                            formatter_class=jobs_fmt, epilog=_job_help("export"))
    export.add_argument("overrides", nargs=argparse.REMAINDER)
    export.set_defaults(fn=_run_job)

    corpus = sub.add_parser("corpus", help="corpora").add_subparsers(dest="action", required=True)
    demo = corpus.add_parser("demo", help="write the demo corpus")
    demo.add_argument("--out")
    demo.add_argument("--distill", action="store_true", help="the distillation prompts instead of the demo's")
    demo.set_defaults(fn=_corpus_demo)

    address_help = "the cluster's dashboard/Job API address (default: RAY_ADDRESS, else http://127.0.0.1:8265)"
    sub_p = sub.add_parser("submit", help="submit a job to a running Ray cluster and follow it")
    sub_p.add_argument("--address", help=address_help)
    sub_p.add_argument("--job", default="generate", help="which jobs/NAME.py to run")
    sub_p.add_argument("--python", default="python", help="the interpreter on the cluster")
    sub_p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sub_p.add_argument("overrides", nargs=argparse.REMAINDER)
    sub_p.set_defaults(fn=_submit)

    st = sub.add_parser("status", help="status (and --logs) of a submitted job")
    st.add_argument("job_id")
    st.add_argument("--address", help=address_help)
    st.add_argument("--logs", action="store_true")
    st.set_defaults(fn=_status)

    qp = sub.add_parser("query", help="read committed runs: runs, manifests, drift summaries and rows, prompts")
    qsub = qp.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", help="storage root (default: COUSINS_STORAGE_ROOT, else outputs)")
    common.add_argument("--json", action="store_true", help="JSON instead of a table")
    runs_p = qsub.add_parser("runs", parents=[common], help="committed runs, newest first")
    runs_p.add_argument("--all", action="store_true", help="runs in progress and failed runs too, with their state")
    for what, help_ in (("show", "a run's manifest: models and row counts"), ("config", "a run's resolved config"),
                        ("summary", "a drift run's summary with CIs and the noise floor"),
                        ("drift", "a page of drift rows, filtered and sorted"),
                        ("prompt", "one prompt's generations by every model, first divergence in ⟦ ⟧"),
                        ("report", "a drift run's report.html")):
        p = qsub.add_parser(what, parents=[common], help=help_)
        p.add_argument("run_id")
        if what == "summary":
            p.add_argument("--cousin", help="one cousin's figures beside the noise floor's")
        elif what == "drift":
            p.add_argument("--cousin")
            p.add_argument("--category")
            p.add_argument("--metric", choices=sorted(METRICS), metavar="METRIC",
                           help=f"numeric column --min/--max apply to (default kld_mean): {', '.join(sorted(METRICS))}")
            p.add_argument("--min", type=float)
            p.add_argument("--max", type=float)
            p.add_argument("--min-kld", type=float, help="rows with kld_mean >= this (--metric kld_mean --min X)")
            p.add_argument("--flips-only", action="store_true", help="rows whose correctness flipped")
            p.add_argument("--errors", action=argparse.BooleanOptionalAction, default=None,
                           help="only error rows (--errors) or only rows without (--no-errors)")
            p.add_argument("--sort", default="kld_mean", choices=sorted(SORT_FIELDS), metavar="FIELD",
                           help=f"column to sort by (default kld_mean, descending): {', '.join(sorted(SORT_FIELDS))}")
            p.add_argument("--asc", action="store_true", help="ascending instead of descending")
            p.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
            p.add_argument("--offset", type=int, default=0)
            p.add_argument("--fields", help="comma-separated columns for --json (default: all but token lists)")
        elif what == "prompt":
            p.add_argument("prompt_id")
            p.add_argument("--sample", type=int, help="one sample index (default: all)")
        elif what == "report":
            p.add_argument("--out", help="write to this file instead of stdout")
    qp.set_defaults(fn=_query)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
