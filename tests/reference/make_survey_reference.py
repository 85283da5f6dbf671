"""Regenerate survey_reference.json: samples, targets and R survey's raked estimate and SE.

Usage (needs R with the survey package, e.g. Debian's r-cran-survey):
    python tests/reference/make_survey_reference.py
The tests read the JSON, so they need no R; tests/test_estimators.py also runs R live if present.
"""

import json
import pathlib
import subprocess
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).parent


def r_rake(x, y, h, p_x, p_y, w=None):
    """(estimate, SE) of svymean(~h) on rake(svydesign(id=~1[, weights=~w]), ~x, ~y)."""
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        rows = ["x,y,h" + (",w" if w is not None else "")]
        for i in range(len(h)):
            extra = f",{float(w[i])!r}" if w is not None else ""
            rows.append(f"{x[i]},{y[i]},{float(h[i])!r}{extra}")
        (d / "s.csv").write_text("\n".join(rows) + "\n")
        for name, p in (("mx.csv", p_x), ("my.csv", p_y)):
            lines = ["level,Freq"] + [f"{k},{1000 * float(v)!r}" for k, v in p.items()]
            (d / name).write_text("\n".join(lines) + "\n")
        out = subprocess.run(["Rscript", str(HERE / "rake_survey.R"), str(d / "s.csv"), str(d / "mx.csv"),
                              str(d / "my.csv")], capture_output=True, text=True, check=True)
    est, se = map(float, out.stdout.split())
    return est, se


def case(seed, n, levels_x, levels_y, probs_x, probs_y, p_x, p_y, weighted=False, dependence=0.5):
    rng = np.random.default_rng(seed)
    xi = rng.choice(len(levels_x), n, p=probs_x)
    # y depends on x, so that raking on both margins is not post-stratification
    shift = (xi[:, None] * dependence + np.arange(len(levels_y))[None, :]) % len(levels_y)
    py = np.asarray(probs_y)[shift.astype(int)]
    yi = np.array([rng.choice(len(levels_y), p=row / row.sum()) for row in py])
    h = 0.7 * xi + 1.3 * (yi == 1) + 0.4 * xi * yi + rng.normal(size=n)
    w = rng.uniform(0.5, 2.0, n) if weighted else None
    x = [levels_x[i] for i in xi]
    y = [levels_y[i] for i in yi]
    tx = dict(zip(levels_x, p_x, strict=True))
    ty = dict(zip(levels_y, p_y, strict=True))
    est, se = r_rake(x, y, h, tx, ty, w)
    return {"x": x, "y": y, "h": h.tolist(), "w": None if w is None else w.tolist(),
            "p_x": tx, "p_y": ty, "r_estimate": est, "r_se": se}


def main():
    cases = {
        "codes_3x4": case(0, 400, [0, 1, 2], [0, 1, 2, 3], [.2, .3, .5], [.1, .2, .3, .4],
                          [.25, .25, .5], [.15, .25, .25, .35]),
        "labels_5x6": case(1, 1000, list("abcde"), ["u", "v", "w", "x", "y", "z"],
                           [.1, .15, .2, .25, .3], [.1, .1, .15, .2, .2, .25],
                           [.2, .2, .2, .2, .2], [.1, .15, .15, .2, .2, .2], dependence=1.0),
        "weighted_3x4": case(2, 600, [0, 1, 2], [0, 1, 2, 3], [.2, .3, .5], [.1, .2, .3, .4],
                             [.25, .25, .5], [.15, .25, .25, .35], weighted=True),
    }
    version = subprocess.run(["Rscript", "-e", "cat(as.character(packageVersion('survey')))"],
                             capture_output=True, text=True, check=True).stdout
    (HERE / "survey_reference.json").write_text(json.dumps({"survey_version": version, "cases": cases}))


if __name__ == "__main__":
    main()
