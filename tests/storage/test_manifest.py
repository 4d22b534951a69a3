"""The export manifest: plain names only, every listed file verified, and what counts as a qvlquant export."""

import json

import pytest

from qvlquant.storage.manifest import (
    MANIFEST,
    PICKLE_SUFFIXES,
    ManifestError,
    is_pickle,
    is_plain_name,
    is_qvlquant_export,
    sha256,
    unlisted_entries,
    update_entry,
    verify_manifest,
    write_manifest,
)


@pytest.fixture
def export(tmp_path):
    folder = tmp_path / "q"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2_vl"}\n')
    (folder / "model.safetensors").write_bytes(b"\x08" + bytes(64))
    write_manifest(folder)
    return folder


def edit_manifest(folder, change):
    data = json.loads((folder / MANIFEST).read_text())
    change(data["files"])
    (folder / MANIFEST).write_text(json.dumps(data))


def test_written_manifest_verifies_and_lists_every_file(export):
    verify_manifest(export)
    files = json.loads((export / MANIFEST).read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors"]
    assert files["model.safetensors"] == {"sha256": sha256(export / "model.safetensors"), "bytes": 65}


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "sub/x.txt", "..", ".", "", "a\\b", MANIFEST])
def test_entry_outside_the_export_fails_even_with_the_right_hash(export, name):
    """RELIABILITY.md 33: a manifest naming ``../x`` with x's true sha256 must not verify."""
    outside = export.parent / "outside.txt"
    outside.write_text("not part of the export\n")
    entry = {"sha256": sha256(outside), "bytes": outside.stat().st_size}
    edit_manifest(export, lambda files: files.update({name: entry}))
    with pytest.raises(ManifestError, match="not a plain file name"):
        verify_manifest(export)


def test_symlinked_entry_fails(export):
    outside = export.parent / "outside.txt"
    outside.write_text("x")
    (export / "link.txt").symlink_to(outside)
    edit_manifest(export, lambda files: files.update({"link.txt": {"sha256": sha256(outside), "bytes": 1}}))
    with pytest.raises(ManifestError, match="link.txt is not a regular file"):
        verify_manifest(export)


def test_edited_missing_and_malformed(export):
    (export / "config.json").write_text('{"model_type": "qwen2_vl", "bits": 3}\n')
    with pytest.raises(ManifestError, match="config.json"):
        verify_manifest(export)
    (export / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is listed .* but missing"):
        verify_manifest(export)
    for text in ("[1, 2]", "{not json", '{"files": ["a"]}', '{"files": {"a": "b"}}'):
        (export / MANIFEST).write_text(text)
        with pytest.raises(ManifestError, match=MANIFEST):
            verify_manifest(export)
        assert not is_qvlquant_export(export)


def test_is_qvlquant_export(export, tmp_path):
    assert is_qvlquant_export(export)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert not is_qvlquant_export(user) and not is_qvlquant_export(user / "notes.txt")
    link = tmp_path / "link"
    link.symlink_to(export)
    assert not is_qvlquant_export(link)
    (export / "notes.txt").write_text("added later by the user")
    assert unlisted_entries(export) == ["notes.txt"]


def test_update_entry_rehashes_only_that_file(export):
    (export / "model.safetensors").write_bytes(b"edited")  # must stay detected
    (export / "config.json").write_text('{"model_type": "qwen2_vl", "repaired": true}\n')
    update_entry(export, "config.json")
    files = json.loads((export / MANIFEST).read_text())["files"]
    assert files["config.json"]["sha256"] == sha256(export / "config.json")
    with pytest.raises(ManifestError, match="model.safetensors"):
        verify_manifest(export)
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors", MANIFEST]  # no temp left


def test_one_list_of_pickle_suffixes():
    assert set(PICKLE_SUFFIXES) == {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
    assert is_pickle("pytorch_model.bin") and is_pickle("W.PT") and is_pickle("x.ckpt")
    assert not is_pickle("model.safetensors") and not is_pickle("config.json")
    assert is_plain_name("model-00001-of-00002.safetensors") and not is_plain_name(3)
