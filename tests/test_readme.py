"""The README's quickstart runs as written."""

import pathlib
import re


def test_readme_quickstart_runs(capsys):
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python block"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert "converged" in capsys.readouterr().out
