"""`rayembed` command line: prepare | train | merge | mine | eval | embed | serve | run | compact.

rayembed train jobs/train.yaml max_steps=10
rayembed embed --model M --input PATH --output PATH [key=value ...]
rayembed serve --model M
rayembed eval --model M
rayembed mine jobs/mine.yaml                       # hard negatives for training pairs
rayembed prepare kind=snli source=../shared/data/snli-esnli output=runs/snli.jsonl
rayembed run jobs/smoke.yaml train.max_steps=3     # every section of the spec, in its order
rayembed run --only embed,train jobs/distill.yaml   # some sections
rayembed compact runs/lake/night-07 runs/lake/full-07  # a chain of embed versions -> one full version
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from rayembed.config import CONFIGS, JOBS
from rayembed.settings import describe
from rayembed.spec import build, load_spec


def _flags(args: argparse.Namespace) -> list[str]:
    """Named flags (--model, --input, --output) as overrides, so the two spellings mix."""
    return [f"{k}={v}" for k in ("model", "input", "output") if (v := getattr(args, k, None)) is not None]


def run_job(job: str, cfg: Any) -> dict[str, Any]:
    if job == "prepare":
        from rayembed.data.prepare import prepare_job

        return prepare_job(cfg)
    if job == "train":
        from rayembed.train.job import train

        return train(cfg)
    if job == "merge":
        from rayembed.train.merge import merge

        return merge(cfg)
    if job == "mine":
        from rayembed.embed.mine import mine

        return mine(cfg)
    if job == "eval":
        from rayembed.eval.job import evaluate

        return evaluate(cfg)
    if job == "embed":
        from rayembed.embed.job import embed

        return embed(cfg)
    from rayembed.serve.deployment import run

    url = run(cfg, blocking=True)
    return {"url": url}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rayembed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for job in (*JOBS, "run"):
        epilog = describe(CONFIGS[job]) if job in CONFIGS else None
        s = sub.add_parser(job, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("spec", nargs="?", help="YAML job spec (jobs/*.yaml)")
        s.add_argument("overrides", nargs="*", help="key=value settings (section.key=value for run)")
        if job == "run":
            s.add_argument("--only", help="comma-separated sections to run (default: all), e.g. embed,train")
        if job not in ("run", "prepare"):
            s.add_argument("--model")
        if job == "embed":
            s.add_argument("--input")
            s.add_argument("--output")
    c = sub.add_parser("compact", help="fold an embed output's chain of versions into one full version")
    c.add_argument("version", help="an embed output (the newest version of a chain), local or s3://")
    c.add_argument("output", help="a new folder: the current view as plain Parquet + a manifest")
    c.add_argument("--overwrite", action="store_true", help="replace an earlier compaction there")
    c.add_argument("--s3-endpoint-url", help="an S3-compatible server (default: AWS)")
    c.add_argument("--bucket-ids", type=int, default=20_000_000, help="ids held in memory at once")
    c.add_argument("--rows-per-file", type=int, default=1_000_000)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, `key=value` overrides wherever they stand: argparse takes the positionals that
    come before a flag (`run SPEC --only train`) as one group and would refuse any after it."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def compact_command(args: argparse.Namespace) -> dict[str, Any]:
    from rayembed.embed.compact import compact

    if args.bucket_ids < 1 or args.rows_per_file < 1:
        raise ValueError("--bucket-ids and --rows-per-file must be >= 1")
    return compact(
        args.version, args.output, args.s3_endpoint_url, args.overwrite, args.bucket_ids, args.rows_per_file
    )


def plan(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The (job, config) pairs a command line asks for, validated, in the spec's section order
    (so a spec may embed teacher vectors before training on them)."""
    spec_path, overrides = args.spec, list(args.overrides)
    if spec_path and "=" in spec_path:  # no spec, only overrides
        overrides.insert(0, spec_path)
        spec_path = None
    job = None if args.command == "run" else args.command
    spec = load_spec(spec_path, overrides + _flags(args), job=job)
    jobs = [j for j in spec if j in JOBS] if job is None else [job]
    only = [j.strip() for j in (getattr(args, "only", None) or "").split(",") if j.strip()]
    if only:
        if set(only) - set(jobs):
            raise ValueError(f"--only {','.join(only)}: the spec's sections are {jobs}")
        jobs = [j for j in jobs if j in only]
    if not jobs:
        raise ValueError("the spec has no job sections")
    return [(name, build(CONFIGS[name], spec.get(name, {}))) for name in jobs]


RAY_JOBS = ("train", "embed", "mine", "serve")


def cluster_cpus(planned: list[tuple[str, Any]]) -> float | None:
    """Logical CPUs for the one local Ray cluster a multi-section run shares: the most any section needs
    (the first section to start Ray would otherwise size it for itself, e.g. embed before train leaves
    training's data reads no CPU). None: fewer than two sections use Ray, each starts what it needs."""
    needs = [getattr(cfg, "local_cpus", lambda: 1)() for job, cfg in planned if job in RAY_JOBS]
    return max(needs) if len(needs) > 1 else None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Runs the command; 0 on success (and for `serve` stopped by Ctrl-C or SIGTERM, its normal end), 2 on
    bad input, 130 when another job is interrupted. A local Ray cluster this process started is stopped
    on the way out, Serve (and its HAProxy) first (io.stop_local_ray)."""
    args = parse(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: the exit path runs (Python's default does not)
    try:
        if args.command == "compact":
            print(json.dumps({"compact": compact_command(args)}, indent=2), flush=True)
            return 0
        planned = plan(args)
        if (cpus := cluster_cpus(planned)) is not None:
            from rayembed.io import ensure_ray

            ensure_ray(cpus)
        for name, cfg in planned:
            print(json.dumps({name: run_job(name, cfg)}, indent=2, default=str), flush=True)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"rayembed {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from rayembed.io import stop_local_ray

        stop_local_ray()
        print(f"rayembed {args.command}: stopped", file=sys.stderr)
        return 0 if args.command == "serve" else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
