"""`cousins` console script: thin wrappers over the library and the jobs.

    cousins models build [--out models/tiny-teacher] [--seed 0]
    cousins generate [hydra overrides…]      # runs jobs/generate.py from this checkout
    cousins drift [hydra overrides…]         # runs jobs/drift.py (the original against its cousins)
    cousins corpus demo [--out PATH]         # (re)writes the bundled demo corpus
    cousins submit [--address URL] [--job generate] [--no-wait] [hydra overrides…]
    cousins status JOB_ID [--address URL]     # a submitted job's status; --logs for its logs
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
    from cousins.models import RECIPES, ensure_model

    out = args.out or f"models/{args.recipe}"
    if args.force:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    ensure_model(out, args.recipe, args.seed)
    print(f"{args.recipe}: {Path(out).resolve()}  ({RECIPES[args.recipe]})")
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


def _corpus_demo(args: argparse.Namespace) -> int:
    from cousins.demo_corpus import DEMO_PATH, DISTILL_PATH, distill_records, write_demo_corpus

    if args.distill:
        print(write_demo_corpus(args.out or DISTILL_PATH, distill_records()))
    else:
        print(write_demo_corpus(args.out or DEMO_PATH))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from cousins.submit import submit

    _, status = submit(args.job, _overrides(args), address=args.address, python=args.python, wait=not args.no_wait)
    return 0 if args.no_wait or status == "SUCCEEDED" else 1


def _status(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    if args.logs:
        print(client.get_job_logs(args.job_id), end="")
    print(f"job {args.job_id}: {str(client.get_job_status(args.job_id)).rsplit('.', 1)[-1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from cousins.models import RECIPES

    parser = argparse.ArgumentParser(prog="cousins", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="tiny models built offline").add_subparsers(dest="action", required=True)
    build = models.add_parser("build", help="build a tiny model from its recipe (skipped if already built)")
    build.add_argument("recipe", nargs="?", default="tiny-teacher", choices=sorted(RECIPES))
    build.add_argument("--out", help="directory to write (default: models/RECIPE)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(fn=_models_build)

    gen = sub.add_parser("generate", help="run jobs/generate.py with Hydra overrides")
    gen.add_argument("overrides", nargs=argparse.REMAINDER)
    gen.set_defaults(fn=_run_job)

    drift = sub.add_parser("drift", help="run jobs/drift.py with Hydra overrides")
    drift.add_argument("overrides", nargs=argparse.REMAINDER)
    drift.set_defaults(fn=_run_job)

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

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
