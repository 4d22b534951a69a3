"""The rule for ``--output`` (RELIABILITY.md 20, 28, 35): only an earlier qvlquant export, an empty folder or an
explicit overwrite is replaced; inputs, the current folder and files never are; publishing is atomic and gives the
user's umask; stale temporary folders of dead exports are cleaned up, live ones never."""

import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from qvlquant.storage.manifest import write_manifest
from qvlquant.storage.outputs import (
    OutputError,
    apply_umask,
    check_output_target,
    check_output_writable,
    clean_stale_temps,
    publish,
    replace_dir,
    restore_stranded,
    temp_dir,
)


def make_export(folder, text="old"):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(f'{{"v": "{text}"}}\n')
    write_manifest(folder)
    return folder


def user_folder(folder):
    (folder / "photos").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    return folder


def tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def new_tmp(out):
    tmp = temp_dir(out)
    (tmp / "config.json").write_text('{"v": "new"}\n')
    write_manifest(tmp)
    return tmp


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_new_empty_and_earlier_export_are_accepted(tmp_path):
    assert check_output_target(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    (tmp_path / "empty").mkdir()
    assert check_output_target(tmp_path / "empty") == tmp_path / "empty"
    assert check_output_target(make_export(tmp_path / "q")) == tmp_path / "q"


def test_folder_of_user_files_needs_overwrite(tmp_path):
    user = user_folder(tmp_path / "userdir")
    before = tree(user)
    with pytest.raises(OutputError, match=rf"{user} exists and is not a qvlquant export.*--overwrite.*another folder"):
        check_output_target(user)
    with pytest.raises(OutputError, match="not a qvlquant export"):
        publish(new_tmp(user), user)  # checked again at publish time: the user's folder survives
    assert tree(user) == before
    assert check_output_target(user, overwrite=True) == user
    assert publish(new_tmp(user), user, overwrite=True) == user and (user / "config.json").exists()


def test_export_holding_user_files_needs_overwrite(tmp_path):
    q = make_export(tmp_path / "q")
    (q / "notes.txt").write_text("added by the user")
    with pytest.raises(OutputError, match=r"also holds \['notes.txt'\]"):
        check_output_target(q)


@pytest.mark.parametrize("where", ["base", "parent_of_base", "calib_folder", "calib_parent"])
def test_inputs_are_never_replaced_even_with_overwrite(tmp_path, where):
    base = make_export(tmp_path / "work" / "mybase")  # even one that looks like an export
    calib = tmp_path / "work" / "data" / "calib.json"
    calib.parent.mkdir()
    calib.write_text("[]")
    out = {"base": base, "parent_of_base": base.parent, "calib_folder": calib.parent, "calib_parent": tmp_path}[where]
    before = tree(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=f"{out} is or contains .*an input of this run.*even with --overwrite"):
            check_output_target(out, [base, calib], overwrite)
    with pytest.raises(OutputError):
        publish(new_tmp(tmp_path / "side"), out, True, [base, calib])
    assert [t for t in tree(tmp_path) if "side" not in t[0]] == before


@pytest.mark.parametrize("out", ["links", "blobs"])
def test_a_symlinked_input_protects_the_link_and_where_it_leads(tmp_path, out):
    """RELIABILITY.md 46: snapshots/REV/model.safetensors -> ../../blobs/SHA, as the Hugging Face cache lays it out."""
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "0a1b").write_bytes(b"weights")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "model.safetensors").symlink_to("../blobs/0a1b")
    with pytest.raises(OutputError, match=f"{tmp_path / out} is or contains {tmp_path / out}/.*an input of this run"):
        check_output_target(tmp_path / out, [tmp_path / "links" / "model.safetensors"], overwrite=True)


def test_current_folder_and_home_are_never_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(make_export(tmp_path / "here"))
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(OutputError, match="contains the current folder.*even with --overwrite"):
            check_output_target(out, overwrite=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(OutputError, match="your home folder"):
        check_output_target(tmp_path / "home", overwrite=True)
    with pytest.raises(OutputError, match="filesystem root"):
        check_output_target("/", overwrite=True)


def test_a_file_is_never_replaced(tmp_path):
    f = tmp_path / "afile.txt"
    f.write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=f"{f} exists and is not a folder"):
            check_output_target(f, overwrite=overwrite)
    with pytest.raises(OutputError, match="is a file, so no folder can be made there"):
        check_output_target(f / "sub", overwrite=True)
    with pytest.raises(OutputError):
        publish(new_tmp(tmp_path / "side"), f, overwrite=True)
    assert f.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir() if "afile" in p.name) == ["afile.txt"]


def test_publish_replaces_an_export_and_keeps_it_when_the_rename_fails(tmp_path, monkeypatch):
    out = make_export(tmp_path / "q")
    publish(new_tmp(out), out)
    assert (out / "config.json").read_text() == '{"v": "new"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no .old / .tmp left beside it
    real = os.replace
    calls = []

    def failing_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    tmp = new_tmp(out)
    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(OSError, match="No space"):
        publish(tmp, out)
    monkeypatch.setattr(os, "replace", real)
    assert (out / "config.json").read_text() == '{"v": "new"}\n' and tmp.exists()


def test_publish_gives_files_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        tmp = temp_dir(tmp_path / "q")
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        assert stat.S_IMODE((tmp / "model.safetensors").stat().st_mode) == 0o600  # what safetensors does
        out = publish(tmp, tmp_path / "q")
        assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        os.umask(0o077)
        apply_umask(out)
        assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o600
        assert stat.S_IMODE(out.stat().st_mode) == 0o700
    finally:
        os.umask(previous)


def test_stale_temps_of_dead_exports_are_cleaned_live_ones_kept(tmp_path):
    out = make_export(tmp_path / "q")
    dead, live = dead_pid(), os.getppid()
    for name in (f".q.tmp-{dead}", f".q.tmp-{live}", f".q.old-{dead}", f".other.tmp-{dead}", ".q.tmp-x"):
        (tmp_path / name).mkdir()
    (tmp_path / f".q.tmp-{dead}" / "model.safetensors").write_bytes(b"half")
    removed = clean_stale_temps(out)
    assert sorted(p.name for p in removed) == [f".q.old-{dead}", f".q.tmp-{dead}"]
    kept = [f".other.tmp-{dead}", ".q.tmp-x", f".q.tmp-{live}", "q"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_a_stranded_old_export_is_put_back(tmp_path):
    dead = dead_pid()
    make_export(tmp_path / f".q.old-{dead}", "previous")
    assert clean_stale_temps(tmp_path / "q") == [tmp_path / f".q.old-{dead}"]
    assert (tmp_path / "q" / "config.json").read_text() == '{"v": "previous"}\n'


def test_replace_dir_keeps_the_old_name_but_follows_the_rule(tmp_path):
    user = user_folder(tmp_path / "userdir")
    with pytest.raises(OutputError):
        replace_dir(new_tmp(user), user)
    assert (user / "notes.txt").read_text() == "mine"


def test_an_unwritable_output_parent_is_refused_up_front(read_only_folder):
    """RELIABILITY.md 47: the folder the output goes in, or the nearest one that exists, must take a new file."""
    for out in (read_only_folder / "q", read_only_folder / "new" / "deeper" / "q"):
        with pytest.raises(OutputError, match=f"--output {out}: cannot create files in {read_only_folder} "):
            check_output_writable(out)
    assert list(read_only_folder.iterdir()) == []


def test_a_writable_parent_is_probed_and_left_as_it_was(tmp_path):
    check_output_writable(tmp_path / "new" / "q")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("length,refused", [(200, False), (243, True), (246, True)])
def test_output_names_too_long_for_what_the_run_creates_beside_them_are_refused(tmp_path, length, refused):
    """A 246-byte name failed with "File name too long" at export, after all the work, and again on every resume:
    .NAME.tmp-PID, .NAME.old-PID, .NAME.partial and .NAME.lock must fit too (PID up to 7 digits)."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "q" * (length - 255 + limit)
    for out in (tmp_path / name, tmp_path / "new" / name):
        if refused:
            with pytest.raises(OutputError, match=rf"\.{name}\.tmp-PID has .* bytes, over the {limit} this "
                                                  "filesystem allows"):
                check_output_target(out)
        else:
            check_output_target(out)
    with pytest.raises(OutputError, match=f"{'x' * (limit + 1)} has {limit + 1} bytes"):
        check_output_target(tmp_path / ("x" * (limit + 1)) / "q")


def test_a_stranded_old_export_is_restored_only_when_the_output_is_missing(tmp_path):
    dead = dead_pid()
    make_export(tmp_path / f".q.old-{dead}", "previous")
    assert restore_stranded(tmp_path / "q") == tmp_path / f".q.old-{dead}"
    assert (tmp_path / "q" / "config.json").read_text() == '{"v": "previous"}\n'
    make_export(tmp_path / f".q.old-{dead}", "older")
    assert restore_stranded(tmp_path / "q") is None  # the output is there: nothing to restore
    make_export(tmp_path / f".r.old-{os.getppid()}", "live")
    assert restore_stranded(tmp_path / "r") is None  # its export is still running (between its two renames)
    assert restore_stranded(tmp_path / "missing" / "q") is None and restore_stranded("/") is None
