"""Argument errors of the `databalance` command: one line on stderr, exit status 2, no traceback."""

import os
import pathlib
import re

import pytest

from databalance.cli import main


def _fails(argv, capsys, match):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("databalance reproduce: error: "), err
    assert re.search(match, lines[0]), lines[0]


def test_out_that_is_an_existing_file(tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("keep me")
    _fails(["reproduce", "--out", str(f), "--quick"], capsys, r"`--out` must be a folder, but .* is an existing file")
    assert f.read_text() == "keep me"


def test_out_below_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    _fails(["reproduce", "--out", str(f / "sub"), "--quick"], capsys,
           r"`--out` .*sub' cannot be created: .*file' is a file, not a folder")


def test_out_that_cannot_be_created(tmp_path, capsys, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    _fails(["reproduce", "--out", str(tmp_path / "new"), "--quick"], capsys,
           r"`--out` .*new' is not a folder this process can write to \(Permission denied\)")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write to read-only folders")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _fails(["reproduce", "--out", str(ro), "--quick"], capsys, r"not a folder this process can write to")
        _fails(["reproduce", "--out", str(ro / "sub"), "--quick"], capsys, r"not a folder this process can write to")
    finally:
        ro.chmod(0o700)


def test_negative_seed(tmp_path, capsys):
    _fails(["reproduce", "--out", str(tmp_path / "r"), "--seed", "-1"], capsys,
           r"`--seed` must be a non-negative integer; got -1")
    assert not (tmp_path / "r").exists()  # checked before anything is created


def test_jobs_below_one(tmp_path, capsys):
    _fails(["reproduce", "--out", str(tmp_path / "r"), "--jobs", "0"], capsys, r"`--jobs` must be at least 1 .*got 0")


def test_argparse_errors_keep_status_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "--quick"])  # --out is required
    assert info.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err
