"""The user guide's code runs: every ``>>>`` example in the pages below is a doctest.

The R, ipfn and POT outputs quoted beside them are recorded, not rerun: only the databalance side
runs here (the peers are not test dependencies).
"""

import doctest
import pathlib

import pytest

GUIDE = pathlib.Path(__file__).parents[1] / "docs" / "guide"
PAGES = ["which_function.rst", "many_margins.rst", "from_r_survey.rst", "from_ipfn.rst", "from_pot.rst",
         "performance.rst"]


@pytest.mark.parametrize("page", PAGES)
def test_guide_page_examples_run(page):
    pytest.importorskip("pandas")
    result = doctest.testfile(str(GUIDE / page), module_relative=False,
                              optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0, f"{page} has no runnable example"
    assert result.failed == 0
