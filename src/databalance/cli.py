"""The `databalance` command (also `python -m databalance`)."""

from __future__ import annotations

import argparse
import sys

from . import _validation


def main(argv=None) -> int:
    """Run the command line; argument errors exit with status 2 and one line on stderr.

    ``databalance reproduce --out DIR [--quick] [--seed S] [--jobs J] [--progress]`` prints the plan,
    one line per finished experiment and the summary on stdout; ``--progress`` adds a progress bar
    (or line) on stderr through the same mechanism as the library's ``progress=`` options.
    """
    parser = argparse.ArgumentParser(prog="databalance", description="Data balancing: reproduce the paper's claims.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run the paper's experiments on synthetic data; write a report and figures")
    rep.add_argument("--out", required=True, help="folder for report.md, results.json and the PNG figures")
    rep.add_argument("--quick", action="store_true", help="fewer replications and sizes (seconds)")
    rep.add_argument("--seed", type=int, default=0, help="non-negative random seed (same seed, same numbers)")
    rep.add_argument("--jobs", type=int, default=1, help="experiments run in parallel processes")
    rep.add_argument("--progress", action="store_true",
                     help="also show a progress bar of the experiments on stderr (tqdm when installed, else a "
                          "line); the per-experiment lines on stdout are printed either way")
    args = parser.parse_args(argv)
    try:
        seed = _validation.cli_seed(args.seed)
        jobs = _validation.cli_jobs(args.jobs)
        out = _validation.output_folder(args.out)
    except ValueError as err:
        # argparse's convention (status 2, "prog: error: ..."), without repeating the usage text.
        rep.exit(2, f"{rep.prog}: error: {err}\n")
    from .reproduce import run

    run(out, quick=args.quick, seed=seed, jobs=jobs, log=lambda msg: print(msg, flush=True), progress=args.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
