"""``atomic_write``: the one way every output file of the project is written."""

from __future__ import annotations

import os
import stat

import pytest

from blockfinder.atomic import atomic_write


def test_bytes_text_and_writer_land_whole(tmp_path):
    atomic_write(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write(tmp_path / "t.txt", "é\n")
    atomic_write(tmp_path / "w.bin", lambda f: f.write(b"xyz"))
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é\n"
    assert (tmp_path / "w.bin").read_bytes() == b"xyz"


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_permissions_are_those_of_a_new_file(tmp_path):
    before = os.umask(0o027)
    try:
        atomic_write(tmp_path / "p.txt", "x")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "p.txt").stat().st_mode) == 0o640
