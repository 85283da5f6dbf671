"""The `databalance` command (also `python -m databalance`)."""

from __future__ import annotations

import argparse
import sys

from . import _validation


def main(argv=None) -> int:
    """Run the command line; argument errors exit with status 2 and one line on stderr."""
    parser = argparse.ArgumentParser(prog="databalance", description="Data balancing: reproduce the paper's claims.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run the paper's experiments on synthetic data; write a report and figures")
    rep.add_argument("--out", required=True, help="folder for report.md, results.json and the PNG figures")
    rep.add_argument("--quick", action="store_true", help="fewer replications and sizes (seconds)")
    rep.add_argument("--seed", type=int, default=0, help="non-negative random seed (same seed, same numbers)")
    rep.add_argument("--jobs", type=int, default=1, help="experiments run in parallel processes")
    args = parser.parse_args(argv)
    try:
        seed = _validation.cli_seed(args.seed)
        jobs = _validation.cli_jobs(args.jobs)
        out = _validation.output_folder(args.out)
    except ValueError as err:
        # argparse's convention (status 2, "prog: error: ..."), without repeating the usage text.
        rep.exit(2, f"{rep.prog}: error: {err}\n")
    from .reproduce import run

    run(out, quick=args.quick, seed=seed, jobs=jobs, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
