"""rewrite_durably: a file saved over and over without allocating or freeing inodes, crash-safe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.fsutil import rewrite_durably


def spares(path: Path) -> tuple[Path, Path]:
    return path.with_name(f".{path.name}.spare-a"), path.with_name(f".{path.name}.spare-b")


@pytest.mark.parametrize("fsync", [True, False])
def test_saves_after_the_second_take_turns_between_two_inodes(tmp_path: Path, fsync: bool) -> None:
    path = tmp_path / "d.state.json"
    inodes = set()
    for i in range(8):
        rewrite_durably(path, b"version %d" % i + b"." * (10 - i), fsync=fsync, mode=0o644)
        assert path.read_bytes() == b"version %d" % i + b"." * (10 - i), "cut to the new length"
        if i >= 2:
            inodes.add(path.stat().st_ino)
    assert len(inodes) == 2, "no inode allocated (or freed) once both spares exist"
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, spares(path)[0].name]) or \
        sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, spares(path)[1].name])


def test_a_spare_still_naming_the_current_version_is_never_overwritten(tmp_path: Path) -> None:
    """A crash between keeping the current version under a spare name and the rename: the spare and the
    file are one inode, and the next save must not write into it."""
    path = tmp_path / "d.state.json"
    rewrite_durably(path, b"current")
    a, b = spares(path)
    for spare in (a, b):
        spare.unlink(missing_ok=True)
    os.link(path, a)  # both spares' states after such a crash: a names the current version ...
    b.write_bytes(b"half-written new version")  # ... and b holds the version the crash interrupted
    rewrite_durably(path, b"next")
    assert path.read_bytes() == b"next"
    rewrite_durably(path, b"after")
    assert path.read_bytes() == b"after"
    assert [p.read_bytes() for p in (a, b) if p.exists()] == [b"next"], "the previous version is kept as the spare"


def test_a_spare_linked_to_the_file_is_left_alone_even_when_it_is_the_only_spare(tmp_path: Path) -> None:
    path = tmp_path / "d.state.json"
    path.write_bytes(b"current")
    os.link(path, spares(path)[0])
    rewrite_durably(path, b"next")
    assert path.read_bytes() == b"next"
    assert spares(path)[0].read_bytes() == b"current"
