"""Every script in examples/ runs, prints its results and draws its figure (as in the docs' gallery)."""

import pathlib
import runpy

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path, capsys, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    # The gallery renders figures left open; here show() must neither block nor warn.
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    plt.close("all")
    try:
        runpy.run_path(str(path), run_name="__main__")
        assert plt.get_fignums(), f"{path.name} draws no figure for the gallery"
    finally:
        plt.close("all")
    assert capsys.readouterr().out.strip()


def test_there_are_examples():
    assert len(EXAMPLES) >= 4


def test_every_example_has_a_gallery_title():
    for path in EXAMPLES:
        lines = path.read_text().splitlines()
        assert lines[0] == '"""' and set(lines[2]) == {"="} and len(lines[2]) == len(lines[1]), path.name
