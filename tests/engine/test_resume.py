"""A run killed halfway resumes from the last finished layer, and gives the same checkpoint as an unbroken run."""

import json
import os
import shutil

import pytest

import qvlquant.quant.apply as quant_methods
from qvlquant.cli import main
from qvlquant.engine.resume import RankStore
from qvlquant.parallel.distributed import World

ARGS = ["quantize", "--method", "gptq", "--bits", "4", "--num-samples", "4"]


def crashing(method: str, at_layer: int, calls: list | None = None):
    """The method's layer function, raising when it reaches decoder layer ``at_layer`` (a simulated kill)."""
    real = quant_methods.LAYER_METHODS[method]

    def run(layer, inputs, ctx):
        if calls is not None:
            calls.append(ctx.prefix)
        if ctx.prefix.endswith(f".{at_layer}"):
            raise RuntimeError("simulated out-of-memory")
        return real(layer, inputs, ctx)

    return run


@pytest.mark.slow
def test_resume_after_a_crash_matches_an_unbroken_run(tmp_path, monkeypatch, capsys):
    assert main(ARGS + ["--output", str(tmp_path / "unbroken")]) == 0
    real = quant_methods.LAYER_METHODS["gptq"]
    calls = []
    monkeypatch.setitem(quant_methods.LAYER_METHODS, "gptq", crashing("gptq", 2, calls))
    out = tmp_path / "resumed"
    assert main(ARGS + ["--output", str(out)]) == 2
    partial = tmp_path / ".resumed.partial"
    assert sorted(p.name for p in partial.glob("layer_*")) == ["layer_0000.safetensors", "layer_0001.safetensors"]
    assert not out.exists()

    calls.clear()
    monkeypatch.setitem(quant_methods.LAYER_METHODS, "gptq", lambda *a: (calls.append(a[-1].prefix), real(*a))[1])
    assert main(ARGS + ["--output", str(out)]) == 0
    assert [c.rsplit(".", 1)[-1] for c in calls] == ["2", "3"]  # layers 0 and 1 came from the partial run
    assert not partial.exists()
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "unbroken" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_partial_run_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    real = quant_methods.LAYER_METHODS["gptq"]
    monkeypatch.setitem(quant_methods.LAYER_METHODS, "gptq", crashing("gptq", 1))
    out = tmp_path / "q"
    assert main(ARGS + ["--output", str(out)]) == 2
    monkeypatch.setitem(quant_methods.LAYER_METHODS, "gptq", real)
    capsys.readouterr()
    assert main(["quantize", "--method", "gptq", "--bits", "8", "--num-samples", "4", "--output", str(out)]) == 2
    assert "partial run of a different model, calibration set or settings" in capsys.readouterr().err
    assert main(["quantize", "--method", "gptq", "--bits", "8", "--num-samples", "4", "--no-resume", "--output", str(out)]) == 0


@pytest.mark.slow
def test_awq_resume_restores_shared_scales(tmp_path, monkeypatch):
    """AWQ's codes carry one scale tensor per group (shared by its linears): they are saved and restored."""
    real = quant_methods.LAYER_METHODS["awq"]
    argv = ["quantize", "--method", "awq", "--bits", "4", "--num-samples", "2"]
    assert main(argv + ["--output", str(tmp_path / "unbroken")]) == 0
    monkeypatch.setitem(quant_methods.LAYER_METHODS, "awq", crashing("awq", 1))
    assert main(argv + ["--output", str(tmp_path / "q")]) == 2
    monkeypatch.setitem(quant_methods.LAYER_METHODS, "awq", real)
    assert main(argv + ["--output", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == (tmp_path / "unbroken" / "model.safetensors").read_bytes()


def _crash_then(monkeypatch, argv, edit, capsys):
    """Crash a run at layer 1, apply ``edit``, rerun: -> (exit code, stderr) of the rerun."""
    real = quant_methods.LAYER_METHODS["gptq"]
    monkeypatch.setitem(quant_methods.LAYER_METHODS, "gptq", crashing("gptq", 1))
    assert main(argv) == 2
    monkeypatch.setitem(quant_methods.LAYER_METHODS, "gptq", real)
    edit()
    capsys.readouterr()
    return main(argv), capsys.readouterr().err


@pytest.mark.slow
def test_edited_calibration_contents_under_the_same_name_are_not_resumed(tmp_path, monkeypatch, capsys):
    data = tmp_path / "calib.jsonl"
    chats = [{"messages": [{"role": "user", "content": f"what is shape {i}?"},
                           {"role": "assistant", "content": "a red circle"}]} for i in range(4)]
    data.write_text("\n".join(json.dumps(c) for c in chats))
    argv = ARGS + ["--calib", str(data), "--output", str(tmp_path / "q")]
    edited = lambda: data.write_text(data.read_text().replace("red", "blue"))  # noqa: E731 same name, same count
    code, err = _crash_then(monkeypatch, argv, edited, capsys)
    assert code == 2 and "partial run of a different model, calibration set or settings" in err


@pytest.mark.slow
def test_replaced_base_weights_of_the_same_size_are_not_resumed(tmp_path, monkeypatch, capsys):
    from qvlquant.assets.paths import MODEL_DIR

    base = tmp_path / "base"
    shutil.copytree(MODEL_DIR, base)
    weights = base / "model.safetensors"

    def edit():
        data = bytearray(weights.read_bytes())
        data[-2] ^= 0x01  # one bf16 value of the last tensor, same size
        weights.write_bytes(bytes(data))

    argv = ARGS + ["--model", str(base), "--calib", "demo", "--output", str(tmp_path / "q")]  # gptq: data named
    code, err = _crash_then(monkeypatch, argv, edit, capsys)
    assert code == 2 and "partial run of a different model, calibration set or settings" in err


def test_only_rank_0_keeps_finished_layers():
    store = RankStore(None, World(rank=1, size=2), [range(1), range(1, 2)])
    for read in (store.finished, lambda: store.load(0), lambda: store.get(0, "x"), store.remove):
        with pytest.raises(RuntimeError, match="rank 1 keeps no finished layers"):
            read()


RTN = ["quantize", "--method", "rtn", "--num-samples", "2"]


def flip(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "a finished layer's weights": ("layer_0000.safetensors", lambda p: flip(p, -3)),
    "the last layer's weights": ("layer_0001.safetensors", lambda p: flip(p, -3)),
    "a layer's metadata": ("layer_0000.safetensors",
                           lambda p: p.write_bytes(p.read_bytes().replace(b"512}", b"511}", 1))),
    "the next layer's inputs": ("inputs.safetensors", lambda p: flip(p, -5)),
}


@pytest.mark.parametrize("what", DAMAGE)
def test_a_damaged_partial_record_is_refused_naming_the_file(tmp_path, capsys, what):
    """RELIABILITY.md 48: bytes flipped in the partial folder were exported as they were, and inspect said verified."""
    argv = RTN + ["--output", str(tmp_path / "q")]
    assert main(argv + ["--max-layers", "2"]) == 0
    name, damage = DAMAGE[what]
    path = tmp_path / ".q.partial" / name
    size = path.stat().st_size
    damage(path)
    assert path.stat().st_size == size
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path}: its contents do not match the checksum written with it" in err and "--no-resume" in err
    assert not (tmp_path / "q").exists()
    assert main(argv + ["--no-resume"]) == 0


def test_base_weights_replaced_with_the_same_size_and_mtime_are_not_resumed(tmp_path, capsys):
    """The hash cache keyed on path, size and mtime: an edit that put the mtime back was read from the cache. The
    key holds the inode and ctime too, which no user can set back."""
    from qvlquant.assets.paths import MODEL_DIR

    base = tmp_path / "base"
    shutil.copytree(MODEL_DIR, base)
    weights = base / "model.safetensors"
    argv = RTN + ["--model", str(base), "--output", str(tmp_path / "q")]
    assert main(argv + ["--max-layers", "1"]) == 0
    before = weights.stat()
    flip(weights, -2)  # one bf16 value of the last tensor, in place: same file, same size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    capsys.readouterr()
    assert main(argv) == 2
    assert "partial run of a different model, calibration set or settings" in capsys.readouterr().err


def a_partial_run(folder):
    """A partial folder as a run leaves it after layer 0: the stamp, layer_0000 and the inputs of layer 1."""
    import torch

    from qvlquant.engine.resume import DiskStore, LayerRecord

    store = DiskStore(folder, "f" * 64)
    record = LayerRecord({"w": torch.ones(2, 2)}, {"q": {"loss": 0.5}}, {"q": 2}, {}, 1.5)
    store.save(0, record, [torch.zeros(1, 3, 4)])
    return store


def with_metadata(path, **changes) -> None:
    """``path`` (a safetensors file of the partial folder) with its metadata entries changed (None: removed)."""
    from broken_models import read_raw, write_raw

    header, data = read_raw(path)
    meta = dict(header.get("__metadata__") or {})
    meta.update({k: v for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:
        meta.pop(k, None)
    header["__metadata__"] = meta
    write_raw(path, header, data)


PARTIAL_FAULTS = {  # what is broken -> (how, which file the message names)
    "stamp not JSON": (lambda d: (d / "fingerprint.json").write_text("{"), "fingerprint.json"),
    "stamp a list": (lambda d: (d / "fingerprint.json").write_text("[1]"), "fingerprint.json"),
    "stamp without a fingerprint": (lambda d: (d / "fingerprint.json").write_text('{"fp": "x"}'), "fingerprint.json"),
    "inputs empty": (lambda d: (d / "inputs.safetensors").write_bytes(b""), "inputs.safetensors"),
    "inputs without a layer": (lambda d: with_metadata(d / "inputs.safetensors", layer=None), "inputs.safetensors"),
    "inputs layer not a number": (lambda d: with_metadata(d / "inputs.safetensors", layer='"x"'),
                                  "inputs.safetensors"),
    "inputs layer negative": (lambda d: with_metadata(d / "inputs.safetensors", layer="-3"), "inputs.safetensors"),
    "inputs metadata a list": (lambda d: with_metadata(d / "inputs.safetensors", layer=[1]), "inputs.safetensors"),
    "layer info a list": (lambda d: with_metadata(d / "layer_0000.safetensors", info="[1]"),
                          "layer_0000.safetensors"),
    "layer without in_features": (lambda d: with_metadata(d / "layer_0000.safetensors", in_features=None),
                                  "layer_0000.safetensors"),
    "layer seconds not a number": (lambda d: with_metadata(d / "layer_0000.safetensors", seconds="soon"),
                                   "layer_0000.safetensors"),
    "layer truncated": (lambda d: (d / "layer_0000.safetensors").write_bytes(
        (d / "layer_0000.safetensors").read_bytes()[:-3]), "layer_0000.safetensors"),
}


@pytest.mark.parametrize("fault", list(PARTIAL_FAULTS))
def test_malformed_partial_files_are_named_with_the_way_out(tmp_path, fault):
    """A stamp, inputs or layer file of .OUTPUT.partial that qvlquant did not write that way: one ValueError naming
    the file and --no-resume, whichever reader meets it first (never a KeyError, TypeError or struct.error)."""
    from qvlquant.engine.resume import DiskStore

    folder = tmp_path / ".q.partial"
    a_partial_run(folder)
    breaks, name = PARTIAL_FAULTS[fault]
    breaks(folder)
    with pytest.raises(ValueError, match=rf"{name}.*(pass|rerun with) --no-resume to start over"):
        store = DiskStore(folder, "f" * 64)
        store.resume_point()
        store.load(0), store.load_info(0), store.tensor_meta(0)


def test_an_intact_partial_run_reads_back(tmp_path):
    import torch

    from qvlquant.engine.resume import DiskStore

    a_partial_run(tmp_path / ".q.partial")
    store = DiskStore(tmp_path / ".q.partial", "f" * 64)
    start, hidden = store.resume_point()
    assert start == 1 and torch.equal(hidden[0], torch.zeros(1, 3, 4))
    record = store.load(0)
    assert record.info == {"q": {"loss": 0.5}} and record.in_features == {"q": 2} and record.seconds == 1.5


@pytest.mark.parametrize("text", ["[1, 2]", "{", '{"a": 3}', "null", '"x"'])
def test_a_malformed_hash_cache_is_ignored_and_rewritten(tmp_path, monkeypatch, text):
    """The sha256 cache is qvlquant's own file: malformed (a list, bad JSON, an entry that is no digest), it is
    treated as empty, the file hashed again and the cache rewritten."""
    import hashlib

    from qvlquant.engine import resume

    monkeypatch.setenv("QVLQUANT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "sha256.json").write_text(text)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    assert resume.file_sha256(weights) == hashlib.sha256(b"weights").hexdigest()
    assert hashlib.sha256(b"weights").hexdigest() in (tmp_path / "cache" / "sha256.json").read_text()


def test_a_cached_entry_that_is_no_digest_is_hashed_again(tmp_path, monkeypatch):
    import hashlib

    from qvlquant.engine import resume

    monkeypatch.setenv("QVLQUANT_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    resume.file_sha256(weights)
    cache = tmp_path / "cache" / "sha256.json"
    cache.write_text(json.dumps({k: [1] for k in json.loads(cache.read_text())}))
    assert resume.file_sha256(weights) == hashlib.sha256(b"weights").hexdigest()
