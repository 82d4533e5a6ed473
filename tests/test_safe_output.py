"""qlora/safe_output.py: partial folders of the older naming (`.DST.xxxxxxxx.partial`, no writer recorded)
are removed only when provably ours and abandoned: this user owns them, nothing in them changed for a day,
and the name is exactly mkdtemp's for DST; anything else is left alone."""
from __future__ import annotations

import os
import tempfile

import qlora.safe_output as so


def old_style_partial(parent, dst_name="dst"):
    """A folder as the older qlora made it (mkdtemp's own naming), with a half-written file in it."""
    folder = tempfile.mkdtemp(prefix=f".{dst_name}.", suffix=".partial", dir=parent)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(b"half")
    return folder


def test_a_recent_old_style_partial_is_kept(tmp_path, capsys):
    folder = old_style_partial(tmp_path)
    assert so.remove_stale_partials(tmp_path / "dst") == []
    assert os.path.isdir(folder) and capsys.readouterr().err == ""


def test_an_abandoned_old_style_partial_is_removed_and_nothing_else(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(so, "OLD_PARTIAL_STALE_SECONDS", -1)  # everything counts as untouched for long enough
    abandoned = old_style_partial(tmp_path)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep").write_text("the output itself")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not ours")
    not_ours = {
        "other output": old_style_partial(tmp_path, "other"),
        "dotted sibling": old_style_partial(tmp_path, "dst.v2"),
        "not mkdtemp's letters": str(tmp_path / ".dst.ABCDEFGH.partial"),
        "too short": str(tmp_path / ".dst.abc.partial"),
    }
    for path in not_ours.values():
        os.makedirs(path, exist_ok=True)
    link = tmp_path / ".dst.abcdefgh.partial"
    link.symlink_to(elsewhere, target_is_directory=True)
    plain_file = tmp_path / ".dst.zyxwvuts.partial"
    plain_file.write_text("a file, not a partial folder")

    removed = so.remove_stale_partials(tmp_path / "dst")
    assert [str(p) for p in removed] == [abandoned] and not os.path.exists(abandoned)
    err = capsys.readouterr().err
    assert f"removed {abandoned}, a partial output of an earlier qlora, untouched for over" in err
    for what, path in not_ours.items():
        assert os.path.isdir(path), what
    assert link.is_symlink() and (elsewhere / "keep").read_text() == "not ours"
    assert plain_file.read_text() == "a file, not a partial folder"
    assert (tmp_path / "dst" / "keep").read_text() == "the output itself"


def test_an_old_style_partial_of_another_user_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(so, "OLD_PARTIAL_STALE_SECONDS", -1)
    folder = old_style_partial(tmp_path)
    me = os.getuid()
    monkeypatch.setattr(so.os, "getuid", lambda: me + 1)  # as if another user had written it
    assert so.remove_stale_partials(tmp_path / "dst") == [] and os.path.isdir(folder)
