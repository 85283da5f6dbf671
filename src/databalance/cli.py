"""The `databalance` command (also `python -m databalance`)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="databalance", description="Data balancing: reproduce the paper's claims.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run the paper's experiments on synthetic data; write a report and figures")
    rep.add_argument("--out", required=True, help="folder for report.md, results.json and the PNG figures")
    rep.add_argument("--quick", action="store_true", help="fewer replications and sizes (under a minute)")
    rep.add_argument("--seed", type=int, default=0, help="random seed (same seed, same numbers)")
    rep.add_argument("--jobs", type=int, default=1, help="experiments run in parallel processes")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    from .reproduce import run

    run(args.out, quick=args.quick, seed=args.seed, jobs=args.jobs, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
