"""Regenerate api_reference.json: R survey's own `api` raking examples (?rake) and its answers.

Usage (needs R with the survey package, e.g. Debian's r-cran-survey):
    python tests/reference/make_api_reference.py
Two samples (apiclus1: equal design weights; apistrat: weights differing by stratum), each raked on
two margins (stype, sch.wide) and on a joint margin plus one (stype x sch.wide, comp.imp): the joint
one is a single variable with six categories, so every case is a two-margin rake. The designs are
``svydesign(id = ~1, weights = ~pw)`` (independent draws, as databalance assumes), raked to
convergence (maxit = 1000, epsilon = 1e-10). The JSON holds the data, the targets and R's mean and
SE of api00 and enroll, so the tests need no R.
"""

import csv
import json
import pathlib
import subprocess
import tempfile

HERE = pathlib.Path(__file__).parent

# The population tables of ?rake (from apipop); the recorded estimates agreeing with R to ~1e-11
# is the check that these are the tables R used.
TARGETS = {
    "two": ({"E": 4421, "H": 755, "M": 1018}, {"No": 1072, "Yes": 5122}),
    "joint": ({"E:No": 472, "E:Yes": 3949, "H:No": 334, "H:Yes": 421, "M:No": 266, "M:Yes": 752},
              {"No": 1712, "Yes": 4482}),
}


def run_r(out_dir: pathlib.Path) -> dict:
    """{case: {variable: (mean, SE)}} from rake_api.R, which also writes each case's data."""
    text = subprocess.run(["Rscript", str(HERE / "rake_api.R"), str(out_dir)], capture_output=True, text=True,
                          check=True).stdout
    results: dict = {}
    for line in text.splitlines():
        case, variable, mean, se = line.split()
        results.setdefault(case, {})[variable] = [float(mean), float(se)]
    return results


def main():
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        results = run_r(d)
        cases = {}
        for case, r in results.items():
            with open(d / f"{case}.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            p_x, p_y = TARGETS[case.rsplit("_", 1)[1]]
            cases[case] = {
                "x": [row["x"] for row in rows], "y": [row["y"] for row in rows],
                "w": [float(row["w"]) for row in rows],
                "values": {v: [float(row[v]) for row in rows] for v in ("api00", "enroll")},
                "p_x": p_x, "p_y": p_y, "r": r,
            }
    version = subprocess.run(["Rscript", "-e", "cat(as.character(packageVersion('survey')))"],
                             capture_output=True, text=True, check=True).stdout
    (HERE / "api_reference.json").write_text(json.dumps({"survey_version": version, "cases": cases}))


if __name__ == "__main__":
    main()
