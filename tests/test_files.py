"""jaxkd.files: a file is written whole or not at all."""

import json
import os

import pytest

from jaxkd import files


def test_writes_replace_whole_files_and_leave_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    files.write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"b": 1, "a": [1, 2]}
    assert path.read_text().startswith('{\n "b": 1')  # the caller's order, indented
    files.write_json(path, {"x": 1}, compact=True)
    assert path.read_text() == '{"x":1}'
    assert files.write_bytes(tmp_path / "w.bin", b"\0" * 10) == 10
    assert files.sha256(tmp_path / "w.bin") == (
        "01d448afd928065458cf670b60f5a594d735af0172c8d67f22a81680132681ca")
    assert sorted(os.listdir(tmp_path)) == ["summary.json", "w.bin"]

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        files.write_json(path, {"new": True})
    assert path.read_text() == '{"x":1}'  # the old file is intact, no temporary is left
    assert sorted(os.listdir(tmp_path)) == ["summary.json", "w.bin"]
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        files.read_json(tmp_path / "missing.json")
