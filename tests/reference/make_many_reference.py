"""Regenerate many_reference.json: R survey raking to three margins, one of them joint.

Usage (needs R with the survey package, e.g. Debian's r-cran-survey):
    python tests/reference/make_many_reference.py
``rake(svydesign(id = ~1, weights = ~pw), list(~stype, ~comp.imp, ~sch.wide + awards), ...)`` on R's
`apisrs` (equal design weights) and `apistrat` (weights differing by stratum), with the population
tables of `apipop`; ``svymean`` of api00 and api99 after maxit = 1, 2, 3, 5 sweeps (databalance's
steps = 3 * maxit) and at convergence (maxit 0 in the JSON). The JSON holds the data, the targets
and R's answers, so the tests need no R.
"""

import csv
import json
import pathlib
import subprocess
import tempfile

HERE = pathlib.Path(__file__).parent
COLUMNS = ("stype", "comp.imp", "sch.wide", "awards")


def run_r(out_dir: pathlib.Path) -> tuple[dict, list[float]]:
    """({sample: {maxit: {variable: (mean, SE)}}}, the population counts) from rake_many.R."""
    text = subprocess.run(["Rscript", str(HERE / "rake_many.R"), str(out_dir)], capture_output=True, text=True,
                          check=True).stdout
    results: dict = {}
    pop: list[float] = []
    for line in text.splitlines():
        parts = line.split()
        if parts[0] == "pop":
            pop = [float(v) for v in parts[1:]]
            continue
        sample, maxit, variable, mean, se = parts
        results.setdefault(sample, {}).setdefault(maxit, {})[variable] = [float(mean), float(se)]
    return results, pop


def targets(pop: list[float]) -> dict:
    """R's population tables (factor levels in R's sorted order) as the estimator's margins."""
    return {"stype": dict(zip("EHM", pop[:3], strict=True)),
            "comp.imp": dict(zip(("No", "Yes"), pop[3:5], strict=True)),
            "sch.wide+awards": {f"{a}|{b}": v for (a, b), v in zip(
                [("No", "No"), ("No", "Yes"), ("Yes", "No"), ("Yes", "Yes")], pop[5:9], strict=True)}}


def main():
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        results, pop = run_r(d)
        cases = {}
        for sample, r in results.items():
            with open(d / f"{sample}.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            cases[sample] = {
                "columns": {c: [row[c] for row in rows] for c in COLUMNS},
                "w": [float(row["pw"]) for row in rows],
                "values": {v: [float(row[v]) for row in rows] for v in ("api00", "api99")},
                "r": r,
            }
    version = subprocess.run(["Rscript", "-e", "cat(as.character(packageVersion('survey')))"],
                             capture_output=True, text=True, check=True).stdout
    (HERE / "many_reference.json").write_text(json.dumps({"survey_version": version, "targets": targets(pop),
                                                          "cases": cases}))


if __name__ == "__main__":
    main()
