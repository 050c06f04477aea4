"""Atomic writes: permissions as a plain ``open`` gives them, all or nothing on failure."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mamba_asr.atomic import TMP_MARK, atomic_open, atomic_path
from mamba_asr.data import char_encoder


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_gets_the_mode_of_a_plain_open(tmp_path: Path, umask: int) -> None:
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        f.write("x")
    with atomic_open(tmp_path / "atomic.txt", "w") as f:
        f.write("x")
    with atomic_path(tmp_path / "by_name.txt") as tmp:
        tmp.write_text("x")
    assert mode(tmp_path / "atomic.txt") == mode(plain) == 0o666 & ~umask
    assert mode(tmp_path / "by_name.txt") == mode(plain)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.txt", "by_name.txt", "plain.txt"]


def test_replacing_a_file_keeps_its_mode_as_open_does(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "manifest.csv"
    target.write_text("old")
    target.chmod(0o640)
    with atomic_open(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and mode(target) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "CKPT.yaml"
    target.write_text("complete\n")
    with pytest.raises(RuntimeError, match="killed"), atomic_open(target, "w") as f:
        f.write("half")
        assert TMP_MARK in Path(f.name).name and not Path(f.name).name.startswith("CKPT")
        raise RuntimeError("killed")
    assert target.read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["CKPT.yaml"]


def test_character_map_is_written_atomically_and_readable_by_others(
    tmp_path: Path, umask: int
) -> None:
    path = tmp_path / "save" / "label_encoder.txt"
    encoder = char_encoder(path, "AB", blank_index=0, bos_index=1, eos_index=2, num_outputs=5)
    assert [encoder.ind2lab[i] for i in range(5)][3:] == ["A", "B"]
    assert mode(path) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["label_encoder.txt"]
