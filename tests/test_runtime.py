from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fishseg.errors import FishsegError
from fishseg.runtime import atomic_path, file_digest, make_output_dir, plural, removed_on_error, write_json


def test_file_digest_is_the_sha256_of_the_bytes_across_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    (tmp_path / "f").write_bytes(data)
    assert file_digest(tmp_path / "f", chunk=1024) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_digest(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_get_the_permissions_of_a_normal_file(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_path_leaves_the_old_file_and_no_temp_on_failure(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "f") as tmp:
        tmp.write_text("new")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["f"] and (tmp_path / "f").read_text() == "old"


def test_make_output_dir_says_what_blocks_the_folder(tmp_path: Path) -> None:
    assert make_output_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(FishsegError, match=r"file/x/y: cannot create the output folder: .*/file is a file, not a "
                                           r"folder; choose another `out`$"):
        make_output_dir(tmp_path / "file" / "x" / "y")
    with pytest.raises(FishsegError, match=r"/file: cannot create the output folder: .*/file is a file"):
        make_output_dir(tmp_path / "file")
    with pytest.raises(FishsegError, match=r"/proc/fishseg/x: cannot create the output folder: No such file or "
                                           r"directory at /proc/fishseg"):
        make_output_dir(Path("/proc/fishseg/x"))


def test_removed_on_error_removes_only_a_folder_it_saw_created(tmp_path: Path) -> None:
    with pytest.raises(ValueError), removed_on_error(tmp_path / "new"):
        (tmp_path / "new").mkdir()
        raise ValueError
    (tmp_path / "old").mkdir()
    with pytest.raises(ValueError), removed_on_error(tmp_path / "old"):
        (tmp_path / "old" / "f").write_text("")
        raise ValueError
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_plural() -> None:
    assert [plural(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert plural(1, "process", "processes") == "1 process" and plural(3, "process", "processes") == "3 processes"
