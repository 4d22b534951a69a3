"""qvlquant push, tested at the huggingface_hub client boundary (no network): one commit, only the export's files,
nothing when verification fails, and the token nowhere."""

import hashlib
import json
import logging
import os
import re

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from qvlquant.checkpoint.push import PushError, model_card, push
from qvlquant.cli import main
from qvlquant.storage.manifest import MANIFEST, sha256, verify_manifest, write_manifest

TOKEN = "hf_SECRETsecretSECRETsecret0123456789"


class FakeApi:
    def __init__(self, fail_with=None):
        self.calls, self.fail_with = [], fail_with

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def create_commit(self, repo_id, operations, **kw):
        if self.fail_with:
            raise self.fail_with
        self.calls.append(("create_commit", repo_id, [op.path_in_repo for op in operations], kw))
        self.sent = {op.path_in_repo: op.path_or_fileobj for op in operations}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("push") / "q"
    assert main(["quantize", "--bits", "4", "--num-samples", "2", "--output", str(out)]) == 0
    return out


def test_one_commit_with_exactly_the_export_files(export_dir):
    api = FakeApi()
    plan = push(export_dir, "me/demo-w4", private=True, revision="v1", api=api)
    listed = json.loads((export_dir / "qvlquant_manifest.json").read_text())["files"]
    assert "README.md" in listed  # the export's own card, replaced by the repo's (sent last, once)
    expected = sorted(set(listed) - {"README.md"}) + ["qvlquant_manifest.json", "README.md"]
    commits = [c for c in api.calls if c[0] == "create_commit"]
    assert len(commits) == 1 and commits[0][2] == expected == plan["files"]
    assert commits[0][3]["revision"] == "v1"
    assert api.calls[0] == ("create_repo", "me/demo-w4", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert ("create_branch", "me/demo-w4", {"branch": "v1", "exist_ok": True}) in api.calls


def test_dry_run_sends_nothing(export_dir, capsys):
    assert main(["push", str(export_dir), "--repo", "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would push" in out and "model.safetensors" in out and "README.md" in out


def test_failed_verification_pushes_nothing(export_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    (broken / "config.json").write_text((broken / "config.json").read_text() + " ")
    api = FakeApi()
    with pytest.raises(PushError, match="verification failed, nothing pushed.*sha256"):
        push(broken, "me/x", api=api)
    assert api.calls == []
    (broken / "qvlquant_manifest.json").unlink()
    with pytest.raises(PushError, match="no qvlquant_manifest.json"):
        push(broken, "me/x", api=api)


def test_token_never_appears(export_dir, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    logging.getLogger("huggingface_hub").setLevel(logging.DEBUG)
    api = FakeApi(fail_with=RuntimeError(f"401 Unauthorized for Authorization: Bearer {TOKEN}"))
    with pytest.raises(PushError) as e:
        push(export_dir, "me/x", api=api)
    assert TOKEN not in str(e.value) and "***" in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # the original exception is not chained
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text
    assert not any(TOKEN in p.read_text(errors="ignore") for p in export_dir.iterdir() if p.is_file() and p.suffix != ".safetensors")


def test_model_card(export_dir, tmp_path):
    report = {"task": "easyvqa", "accuracy": 77.5, "n": 100, "perplexity": 34.3, "model": "q",
              "baseline": {"task": "easyvqa", "accuracy": 77.9, "n": 100, "perplexity": 34.16, "model": "demo"}}
    card = model_card(export_dir, "me/demo-w4", report)
    meta = ModelCard(card).data.to_dict()
    assert meta["pipeline_tag"] == "image-text-to-text" and "gptq" in meta["tags"] and "4-bit" in meta["tags"]
    assert "| demo | easyvqa | 77.90 | 100 | 34.160 |" in card and "| q | easyvqa | 77.50 | 100 | 34.300 |" in card
    assert 'model_id = "me/demo-w4"' in card and "vllm serve me/demo-w4" in card and "# demo-w4" in card
    assert "| Weights | INT4, groups of 128, symmetric |" in card and "| Quantization | RTN (round-to-nearest) |" in card
    assert "Not yet run" not in card  # the eval table replaced the hint


def test_push_sends_the_card_for_the_repo_and_a_manifest_that_verifies_it(export_dir, tmp_path):
    """The export's README.md names the folder; the pushed one names the repo, and the pushed manifest re-hashes it
    (every other entry as exported), so a download of the repo verifies."""
    assert 'model_id = "q"' in (export_dir / "README.md").read_text()
    api = FakeApi()
    plan = push(export_dir, "me/demo-w4", api=api)
    assert plan["files"].count("README.md") == 1 and plan["files"][-1] == "README.md"
    card, manifest = api.sent["README.md"], json.loads(api.sent[MANIFEST])["files"]
    assert b'model_id = "me/demo-w4"' in card
    assert manifest["README.md"] == {"sha256": hashlib.sha256(card).hexdigest(), "bytes": len(card)}
    exported = json.loads((export_dir / MANIFEST).read_text())["files"]
    assert {k: v for k, v in manifest.items() if k != "README.md"} == {k: v for k, v in exported.items() if k != "README.md"}
    download = tmp_path / "download"  # the repo as a user would download it
    download.mkdir()
    for name in plan["files"]:
        sent = api.sent[name]
        (download / name).write_bytes(sent if isinstance(sent, bytes) else (export_dir / name).read_bytes())
    verify_manifest(download)


def test_license_carried_from_a_local_base(export_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    copy = tmp_path / "q"
    shutil.copytree(export_dir, copy)
    report = json.loads((copy / "quantize_report.json").read_text())
    report["base_model"] = str(base)
    (copy / "quantize_report.json").write_text(json.dumps(report))
    meta = ModelCard(model_card(copy, "me/x")).data.to_dict()
    assert meta["license"] == "mit" and "base_model" not in meta  # a local path is no hub id


def test_license_carried_from_a_hub_base_in_the_cache(export_dir, tmp_path, monkeypatch):
    import shutil

    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: apache-2.0\n---\n")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name: str(readme))
    copy = tmp_path / "q"
    shutil.copytree(export_dir, copy)
    report = json.loads((copy / "quantize_report.json").read_text())
    report["base_model"] = "Qwen/Qwen2-VL-2B-Instruct"
    (copy / "quantize_report.json").write_text(json.dumps(report))
    meta = ModelCard(model_card(copy, "me/x")).data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert meta["base_model_relation"] == "quantized"


def tiny_export(folder):
    """A hand-made export with its manifest (no quantization run)."""
    folder.mkdir()
    config = {"model_type": "qwen2_vl", "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(4)}, str(folder / "model.safetensors"))
    write_manifest(folder)
    return folder


def add_entry(folder, name, path):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def test_tiny_export_pushes(tmp_path):
    api = FakeApi()
    push(tiny_export(tmp_path / "q"), "me/x", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[1][2] == ["config.json", "model.safetensors", MANIFEST, "README.md"]


def test_manifest_naming_a_file_outside_pushes_nothing(tmp_path):
    """RELIABILITY.md 33 / issue 13: ``../outside.txt`` with the right hash fails before ``create_repo``."""
    q = tiny_export(tmp_path / "q")
    outside = tmp_path / "outside.txt"
    outside.write_text("a file of the user, beside the export\n")
    add_entry(q, "../outside.txt", outside)
    api = FakeApi()
    with pytest.raises(PushError, match=r"verification failed, nothing pushed.*'\.\./outside\.txt' is not a plain"):
        push(q, "me/x", api=api)
    assert api.calls == []


@pytest.mark.parametrize("name", ["extra.bin", "opt.pt", "w.pth", "s.pkl", "x.pickle", "last.ckpt", "W.PT"])
def test_pickle_files_are_never_pushed(tmp_path, name):
    q = tmp_path / "q"
    tiny_export(q)
    (q / name).write_bytes(b"\x80\x04pickle")
    write_manifest(q)  # even when listed with the right hash
    api = FakeApi()
    with pytest.raises(PushError, match=rf"pickle files \['{name}'\] are never pushed"):
        push(q, "me/x", api=api)
    assert api.calls == []


def test_index_shard_outside_the_manifest_pushes_nothing(tmp_path):
    q = tiny_export(tmp_path / "q")
    index = {"metadata": {}, "weight_map": {"w": "model.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (q / "model.safetensors.index.json").write_text(json.dumps(index))
    write_manifest(q)
    (q / "model-00002-of-00002.safetensors").write_bytes(b"unlisted")
    api = FakeApi()
    with pytest.raises(PushError, match=r"shards \['model-00002-of-00002.safetensors'\] named in the index"):
        push(q, "me/x", api=api)
    assert api.calls == []


def exposed(text: str, token: str = TOKEN) -> bool:
    """Whether ``token``'s secret part is readable in ``text`` once whitespace, quotes and escapes are dropped (a
    token split across lines or escaped by repr / JSON still counts)."""
    return token[3:] in re.sub(r"\\+[rnt]|[\s\\'\"]", "", text)


FORMS = {  # how a token read from a CRLF .env can show up in a client's exception text
    "raw": lambda t: f"401 for Bearer {t}",
    "repr of the headers": lambda t: f"401 Unauthorized, headers={ {'authorization': f'Bearer {t}'}!r}",
    "repr of a repr": lambda t: repr(repr({"authorization": f"Bearer {t}"})),
    "json": lambda t: json.dumps({"headers": {"authorization": f"Bearer {t}"}}),
    "quoted": lambda t: f'token "{t.strip()}" refused',
    "split across lines": lambda t: f"Bearer {t[:12]}\n    {t[12:]}",
    "split, escaped": lambda t: repr(f"Bearer {t[:12]}\n{t[12:]}"),
    "another hf_ token": lambda t: "cached login hf_" + "Z" * 30 + " refused",
}


@pytest.mark.parametrize("form", FORMS)
def test_token_with_a_crlf_is_scrubbed_in_every_form(tmp_path, monkeypatch, form):
    """HF_TOKEN from a .env saved with CRLF: the client's error may hold the token raw, escaped (repr / JSON),
    quoted or wrapped onto two lines; none of them reaches the PushError."""
    raw = TOKEN + "\r\n"
    monkeypatch.setenv("HF_TOKEN", raw)
    text = FORMS[form](raw)
    secret = "hf_" + "Z" * 30 if form == "another hf_ token" else TOKEN
    assert exposed(text, secret)  # the form as the client would print it
    api = FakeApi(fail_with=RuntimeError(text))
    with pytest.raises(PushError, match=r"push to me/x failed: RuntimeError: .*\*\*\*") as e:
        push(tiny_export(tmp_path / "q"), "me/x", api=api)
    assert not exposed(str(e.value), secret), str(e.value)


def test_token_whitespace_is_stripped_before_the_client_sees_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", f"  {TOKEN}\r\n")
    seen = []

    class Client(FakeApi):
        def __init__(self, token=None):
            super().__init__()
            seen.append(token)

    monkeypatch.setattr("huggingface_hub.HfApi", Client)
    push(tiny_export(tmp_path / "q"), "me/x")
    assert seen == [TOKEN]


@pytest.mark.parametrize("bad", [TOKEN[:10] + " " + TOKEN[10:], TOKEN[:10] + "\r\n" + TOKEN[10:], TOKEN + "\x07x"])
def test_token_with_inner_whitespace_or_control_characters_is_refused_unprinted(tmp_path, monkeypatch, bad):
    monkeypatch.setenv("HF_TOKEN", bad)
    api = FakeApi()
    with pytest.raises(PushError, match=r"HF_TOKEN holds whitespace or control characters") as e:
        push(tiny_export(tmp_path / "q"), "me/x", api=api)
    assert api.calls == [] and TOKEN[:10] not in str(e.value) and TOKEN[10:] not in str(e.value)


def test_cached_login_is_stripped_and_checked_too(monkeypatch):
    from qvlquant.checkpoint.push import resolve_token

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: TOKEN + "\n")
    assert resolve_token() == TOKEN
    monkeypatch.setattr("huggingface_hub.get_token", lambda: TOKEN[:5] + "\t" + TOKEN[5:])
    with pytest.raises(PushError, match="the cached login .* holds whitespace or control characters"):
        resolve_token()


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "folder"])
def test_eval_report_that_is_not_a_regular_file_exits_2_unread(tmp_path, capsys, deadline, kind):
    """``push --eval /dev/zero`` read until memory ran out; a FIFO with no writer blocked for ever."""
    q = tiny_export(tmp_path / "q")
    if kind == "fifo":
        os.mkfifo(tmp_path / "eval.json")
    path = {"dev-zero": "/dev/zero", "fifo": str(tmp_path / "eval.json"), "folder": str(tmp_path)}[kind]
    with deadline(5):
        assert main(["push", str(q), "--repo", "me/x", "--dry-run", "--eval", path]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qvlquant push: error: eval report {path} is not a regular file (a FIFO, a device or a folder); give a file"]


def test_eval_report_over_the_cap_or_not_a_report_is_refused(tmp_path, capsys):
    q = tiny_export(tmp_path / "q")
    big = tmp_path / "eval.json"
    with open(big, "wb") as f:
        f.truncate((1 << 20) + 1)  # sparse
    assert main(["push", str(q), "--repo", "me/x", "--dry-run", "--eval", str(big)]) == 2
    assert f"eval report {big} is 1048577 bytes, over the 1 MiB cap" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["push", str(q), "--repo", "me/x", "--dry-run", "--eval", str(tmp_path / "list.json")]) == 2
    assert "not an eval report" in capsys.readouterr().err


@pytest.mark.parametrize("data,message", [
    ({"task": "easyvqa", "accuracy": 77.5, "baseline": [1]}, "baseline: not an eval report"),
    ({"task": ["easyvqa"], "accuracy": 77.5}, "task must be a task name"),
    ({"task": "easyvqa", "accuracy": 77.5, "perplexity": 30.0, "baseline": {"task": "easyvqa", "accuracy": 70,
                                                                             "perplexity": "x"}},
     "baseline: perplexity must be a finite number"),
])
def test_eval_report_of_the_wrong_shape_is_refused_naming_the_field(tmp_path, capsys, data, message):
    """What the card reads of a report is checked where the report is read: one line, exit 2, nothing sent."""
    q = tiny_export(tmp_path / "q")
    (tmp_path / "eval.json").write_text(json.dumps(data))
    assert main(["push", str(q), "--repo", "me/x", "--dry-run", "--eval", str(tmp_path / "eval.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(tmp_path / "eval.json") in err and len(err.splitlines()) == 1


def test_an_eval_report_without_n_or_model_still_fills_the_card(tmp_path):
    q = tiny_export(tmp_path / "q")
    api = FakeApi()
    push(q, "me/x", eval_report={"task": "docvqa", "accuracy": 50.0}, api=api)
    assert b"| ? | docvqa | 50.00 | - | - |" in api.sent["README.md"]


def test_eval_report_path_fills_the_card(tmp_path):
    q = tiny_export(tmp_path / "q")
    (tmp_path / "eval.json").write_text(json.dumps({"task": "easyvqa", "accuracy": 77.5, "n": 100, "model": "q"}))
    api = FakeApi()
    push(q, "me/x", eval_report=tmp_path / "eval.json", api=api)
    assert b"| q | easyvqa | 77.50 | 100 | - |" in api.sent["README.md"]


def test_an_export_whose_config_is_a_list_pushes_nothing(tmp_path, capsys):
    q = tiny_export(tmp_path / "q")
    (q / "config.json").write_text("[1]")
    write_manifest(q)
    assert main(["push", str(q), "--repo", "me/x", "--dry-run"]) == 2
    assert "config.json: not a JSON object" in capsys.readouterr().err
