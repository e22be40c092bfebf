"""`atomic_dir`: the one write-then-rename helper behind prepared datasets, tokenized caches and checkpoints."""
from __future__ import annotations

import errno
import os

import pytest

from tasks.common import atomic_dir


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_success_renames_into_place(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f".out.tmp-{os.getpid()}" and not final.exists()
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new"
    assert _names(tmp_path) == ["out"]


def test_replace_swaps_the_old_dir(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert _names(final) == ["a.txt"]
    assert _names(tmp_path) == ["out"]  # neither tmp nor the moved-aside old one is left


def test_exception_leaves_final_untouched_and_no_tmp(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert _names(final) == ["old.txt"] and (final / "old.txt").read_text() == "old"
    assert _names(tmp_path) == ["out"]


def test_exception_without_final_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "out"):
            raise ValueError
    assert _names(tmp_path) == []


def test_stale_tmp_is_removed_first(tmp_path):
    stale = tmp_path / f".out.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "junk").write_text("from a crashed run")
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp == stale and _names(tmp) == []
        (tmp / "a.txt").write_text("new")
    assert _names(tmp_path / "out") == ["a.txt"]
    assert _names(tmp_path) == ["out"]


def test_replace_false_keeps_existing(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "first.txt").write_text("first writer")
    with atomic_dir(final, replace=False) as tmp:
        (tmp / "second.txt").write_text("second writer")
    assert _names(final) == ["first.txt"]
    assert _names(tmp_path) == ["out"]


def test_replace_false_writes_when_absent(tmp_path):
    with atomic_dir(tmp_path / "out", replace=False) as tmp:
        (tmp / "a.txt").write_text("x")
    assert _names(tmp_path / "out") == ["a.txt"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EFBIG])
def test_storage_errors_become_one_clear_error(tmp_path, code):
    final = tmp_path / "out"
    with pytest.raises(OSError) as ei:
        with atomic_dir(final):
            raise OSError(code, os.strerror(code))
    assert ei.value.errno == code
    assert str(final) in str(ei.value) and "earlier files were left intact" in str(ei.value)
    assert isinstance(ei.value.__cause__, OSError)
    assert _names(tmp_path) == []


def test_other_os_errors_pass_through(tmp_path):
    err = FileNotFoundError(errno.ENOENT, "missing")
    with pytest.raises(FileNotFoundError) as ei:
        with atomic_dir(tmp_path / "out"):
            raise err
    assert ei.value is err
