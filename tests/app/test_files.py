"""Tests of the atomic-write helpers: a reader never sees a half-written file or folder."""

from __future__ import annotations

import json

import pytest

from dropbp.app.files import AtomicDir, atomic_path, write_json, write_text


class Boom(Exception):
    pass


def test_atomic_path_renames_on_success_and_keeps_the_suffix(tmp_path):
    target = tmp_path / "sub" / "plot.png"  # the parent folder is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert tmp.suffix == ".png"  # matplotlib picks the format from it
        assert not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["plot.png"]


def test_failing_block_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old\n")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise Boom
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_failing_block_creates_nothing_when_there_was_no_file(tmp_path):
    with pytest.raises(Boom), atomic_path(tmp_path / "new.txt"):
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_write_text_replaces_and_writes_utf8_with_lf(tmp_path):
    target = tmp_path / "data.jsonl"
    target.write_text("old")
    write_text(target, "héllo\nwörld\n")
    assert target.read_bytes() == "héllo\nwörld\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_write_json_round_trip(tmp_path):
    value = {"rows": {"baseline": {"loss": 1.25, "accuracy": None}}, "rates": [0.0, 0.5], "name": "ü"}
    target = tmp_path / "compare.json"
    write_json(target, value)
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == value
    assert text.endswith("}\n") and "\n  " in text  # indented, one final newline
    write_json(target, [1, 2], dumps=json.dumps)
    assert target.read_text() == "[1, 2]\n"


def test_write_json_that_cannot_serialize_leaves_the_old_file(tmp_path):
    target = tmp_path / "config.json"
    write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_atomic_dir_replaces_the_folder_only_on_success(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "old.txt").write_text("old")

    with pytest.raises(Boom), AtomicDir(final) as out:
        assert out != final and out.parent == final.parent
        (out / "new.txt").write_text("new")
        raise Boom
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the partial folder is gone

    with AtomicDir(final) as out:
        (out / "new.txt").write_text("new")
        assert not (final / "new.txt").exists()  # nothing visible until the block ends
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_atomic_dir_creates_a_new_folder_and_clears_a_stale_partial(tmp_path):
    final = tmp_path / "deep" / "run"
    writer = AtomicDir(final)
    writer.tmp.mkdir(parents=True)
    (writer.tmp / "stale.txt").write_text("left by a killed run")
    with writer as out:
        assert list(out.iterdir()) == []
        (out / "a.txt").write_text("a")
    assert [p.name for p in final.iterdir()] == ["a.txt"]
    assert [p.name for p in final.parent.iterdir()] == ["run"]


def test_written_files_get_the_mode_a_plain_open_gives(tmp_path):
    import os

    from dropbp.app.files import write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_text(tmp_path / "atomic.txt", "x")
    assert os.stat(tmp_path / "atomic.txt").st_mode == os.stat(plain).st_mode
