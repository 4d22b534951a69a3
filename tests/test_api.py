"""qvlquant.quantize as a Python call, and the checks it makes before any work: --output, processor files."""

import hashlib
import json
import os
import re
import shutil

import pytest
from broken_models import (
    demo_copy,
    drop_tensor,
    edit_header,
    edit_json,
    edit_text_config,
    set_values,
)

import qvlquant
import qvlquant.quant.apply as quant_methods
from qvlquant import api
from qvlquant.assets.paths import MODEL_DIR
from qvlquant.cli import main
from qvlquant.storage.lock import lock_path, output_lock


@pytest.mark.slow
def test_quantize_from_python_with_the_awq_defaults(tmp_path):
    """qvlquant.quantize(output=..., method="awq") works: the config owns AWQ's asymmetric default."""
    report = qvlquant.quantize(output=str(tmp_path / "q"), method="awq", num_samples=2)
    assert report["method"] == "awq" and report["sym"] is False and report["bits"] == 4
    assert len(report["layers"]) == 28 and report["peak_rss_gib"] > 0.1
    assert set(report["phase_seconds"]) >= {"capture", "load", "scale", "clip", "pack", "replay", "save"}
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "q" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # not save_file's 0600


def test_a_setting_the_scheme_ignores_is_refused_from_python_before_any_work(tmp_path):
    """Issue 26 from Python: flat settings and a JobConfig get the check the flags get, before any output exists."""
    from qvlquant.config import JobConfig
    from qvlquant.quant.spec import QuantConfig, QuantSpec

    out = tmp_path / "q"
    with pytest.raises(ValueError, match=r"^--bits does not apply to --scheme W8A8 .*--method gptq --bits 4$"):
        qvlquant.quantize(output=str(out), scheme="W8A8", bits=4)
    with pytest.raises(ValueError, match=r"^--group-size does not apply to --scheme W8A8 .*: drop it"):
        qvlquant.quantize(JobConfig(output=str(out), scheme="W8A8", quant=QuantConfig("gptq", QuantSpec(4, 64))))
    assert not out.exists()


@pytest.mark.slow
def test_max_layers_stops_early_and_a_rerun_finishes_byte_identically(tmp_path):
    argv = ["quantize", "--method", "gptq", "--num-samples", "2"]
    assert main(argv + ["--output", str(tmp_path / "whole")]) == 0
    assert main(argv + ["--max-layers", "2", "--output", str(tmp_path / "q")]) == 0
    partial = tmp_path / ".q.partial"
    assert not (tmp_path / "q").exists() and (partial / "report.json").exists()
    assert sorted(p.name for p in partial.glob("layer_*")) == ["layer_0000.safetensors", "layer_0001.safetensors"]
    assert main(argv + ["--output", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def user_folder(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "photos").mkdir()
    return path


@pytest.mark.parametrize("target", ["user files", "the base model", "a file"])
def test_output_that_is_not_an_export_is_refused_before_any_work(tmp_path, capsys, target):
    base = tmp_path / "base"
    shutil.copytree(MODEL_DIR, base)
    out = {"user files": user_folder(tmp_path / "userdir"), "the base model": base,
           "a file": tmp_path / "afile.txt"}[target]
    if target == "a file":
        out.write_text("keep me")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()
    assert main(["quantize", "--model", str(base), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and len(err.strip().splitlines()) == 1
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp or partial left


def test_missing_processor_files_are_named(tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(MODEL_DIR, base)
    for f in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (base / f).unlink()
    assert main(["quantize", "--model", str(base), "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "has no processor files (tokenizer.json or tokenizer_config.json or vocab.json;" in err
    assert "copy them from the base model's hub repo" in err and not (tmp_path / "q").exists()


def test_an_export_vllm_refuses_is_warned_about_before_any_work(tmp_path, capsys):
    """True act-order (desc_act without static groups) is refused by vLLM 0.33: said at the start, not found at
    serving time; with static groups it is written as desc_act false and nothing is said."""
    argv = ["quantize", "--method", "gptq", "--num-samples", "2", "--max-layers", "1"]
    assert main(argv + ["--desc-act", "--output", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "warning: vLLM" in err and "desc_act" in err
    assert main(argv + ["--desc-act", "--static-groups", "--output", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_export_carries_the_files_serving_stacks_read_from_the_base(tmp_path):
    """generation_config.json (sampling defaults), the chat template and the image / video processors' settings of
    the base reach the export byte for byte, listed in its manifest; the hub cache's symlinked files too."""
    base = tmp_path / "base"
    shutil.copytree(MODEL_DIR, base)
    blob = tmp_path / "blobs" / "video"
    blob.parent.mkdir()
    blob.write_text('{"video_processor_type": "Qwen2VLVideoProcessor", "fps": 2.0}\n')
    (base / "video_preprocessor_config.json").symlink_to(blob)  # the hub cache's layout
    gen = json.loads((base / "generation_config.json").read_text())
    gen.update(temperature=0.7, top_p=0.8, do_sample=True)
    (base / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    assert main(["quantize", "--model", str(base), "--num-samples", "2", "--output", str(tmp_path / "q")]) == 0
    out = tmp_path / "q"
    for name in ("generation_config.json", "video_preprocessor_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
        assert not (out / name).is_symlink()
    manifest = json.loads((out / "qvlquant_manifest.json").read_text())
    assert {"generation_config.json", "video_preprocessor_config.json", "chat_template.jinja"} <= set(
        manifest.get("files", manifest))


RUN = ["quantize", "--method", "rtn", "--num-samples", "2", "--max-layers", "1"]


def test_a_run_into_an_output_another_run_holds_is_refused(tmp_path, capsys):
    """RELIABILITY.md 45: the second run is refused at once, naming the first; it touches nothing of the first's."""
    out = tmp_path / "q"
    with output_lock(out, "qvlquant quantize (the first run)"):
        assert main(RUN + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another run: pid {os.getpid()}" in err and "(the first run)" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial folder, and the first run's lock released


def test_the_output_is_locked_for_the_whole_run_and_released_however_it_ends(tmp_path, monkeypatch):
    out = tmp_path / "q"
    real = quant_methods.LAYER_METHODS["rtn"]
    holders = []

    def spying(layer, inputs, ctx):
        holders.append(json.loads(lock_path(out).read_text())["pid"] if lock_path(out).exists() else None)
        return real(layer, inputs, ctx)

    monkeypatch.setitem(quant_methods.LAYER_METHODS, "rtn", spying)
    assert main(RUN + ["--output", str(out)]) == 0
    assert holders == [os.getpid()] and not lock_path(out).exists()

    def crashing(layer, inputs, ctx):
        if ctx.prefix.endswith(".1"):
            raise RuntimeError("simulated out-of-memory")
        return real(layer, inputs, ctx)

    monkeypatch.setitem(quant_methods.LAYER_METHODS, "rtn", crashing)
    assert main(["quantize", "--method", "rtn", "--num-samples", "2", "--output", str(out)]) == 2  # fails at layer 1
    assert not lock_path(out).exists() and (tmp_path / ".q.partial").exists()


def tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def refused_as_an_input(argv, out, capsys, monkeypatch):
    """Run ``argv --overwrite --output out``: refused naming ``out`` as an input, before any sample is encoded."""
    monkeypatch.setattr("qvlquant.api.build_batches", lambda *a, **k: pytest.fail("samples encoded before the check"))
    capsys.readouterr()
    assert main(argv + ["--overwrite", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--output {out} is or contains" in err and "an input of this run" in err, err
    assert "even with --overwrite" in err and len(err.strip().splitlines()) == 1


def test_overwrite_never_replaces_the_image_folder_a_calibration_file_points_into(tmp_path, capsys, monkeypatch):
    """RELIABILITY.md 46: the images are inputs as much as the JSONL naming them."""
    from PIL import Image

    data, images = tmp_path / "data", tmp_path / "data" / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(2):
        Image.new("RGB", (56, 56), (120 * i, 90, 200)).save(images / f"{i}.png")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": f"images/{i}.png"},
                                                               {"type": "text", "text": "what colour is it?"}]},
                                  {"role": "assistant", "content": "blue"}]})
    (data / "calib.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    before = tree(images)
    refused_as_an_input(RUN[:-2] + ["--calib", str(data / "calib.jsonl")], images, capsys, monkeypatch)
    assert tree(images) == before


def test_overwrite_never_replaces_a_local_hf_dataset(tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["a red circle", "a blue square"]}).save_to_disk(str(folder))
    before = tree(folder)
    columns = ["--text-column", "text", "--image-column", "", "--question-column", "", "--answer-column", ""]
    refused_as_an_input(RUN[:-2] + ["--calib", f"hf:{folder}", *columns], folder, capsys, monkeypatch)
    assert tree(folder) == before


def hub_cache_snapshot(root):
    """The demo model laid out as the Hugging Face cache does: snapshots/REV/NAME -> ../../blobs/SHA256."""
    blobs, snapshot = root / "blobs", root / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in MODEL_DIR.iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return blobs, snapshot


@pytest.mark.parametrize("target", ["blobs", "cache root"])
def test_overwrite_never_replaces_the_folder_a_symlinked_model_resolves_to(tmp_path, capsys, monkeypatch, target):
    blobs, snapshot = hub_cache_snapshot(tmp_path / "models--demo")
    out = {"blobs": blobs, "cache root": tmp_path}[target]
    before = tree(blobs)
    refused_as_an_input(RUN[:-2] + ["--model", str(snapshot)], out, capsys, monkeypatch)
    assert tree(blobs) == before
    assert (snapshot / "model.safetensors").read_bytes() == (MODEL_DIR / "model.safetensors").read_bytes()


def refused_before_any_work(argv, capsys, monkeypatch) -> str:
    """Run ``argv``: exit 2 with one line, before any calibration sample is read. -> the line."""
    monkeypatch.setattr("qvlquant.api.load_samples", lambda *a, **k: pytest.fail("calibration data read"))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_an_unwritable_output_parent_is_refused_before_any_work(read_only_folder, capsys, monkeypatch):
    """RELIABILITY.md 47: it failed after calibration and a layer."""
    out = read_only_folder / "q"
    err = refused_before_any_work(RUN + ["--output", str(out)], capsys, monkeypatch)
    assert f"--output {out}: cannot create files in {read_only_folder} (" in err


def test_an_output_name_too_long_for_its_temporary_folders_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A 246-byte name failed with "File name too long" only at export, and again on every resume."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")  # 255 on most filesystems
    out = tmp_path / ("q" * (limit - 9))  # .NAME.partial fits exactly; .NAME.tmp-1234567 does not
    err = refused_before_any_work(RUN + ["--output", str(out)], capsys, monkeypatch)
    assert f".{out.name}.tmp-PID has {limit + 4} bytes, over the {limit} this filesystem allows" in err
    assert list(tmp_path.iterdir()) == []


def no_calibration(*args, **kwargs):
    raise AssertionError("calibration started: the check came too late")


def checked_first(build):
    """build_skeleton, refusing a config.json whose counts would build more than the demo's layers and blocks
    (config.json's sizes must be checked against the checkpoint before the skeleton is built)."""
    def guarded(config, family, dtype):
        assert config.text_config.num_hidden_layers <= 4 and config.vision_config.depth <= 2, "built before checked"
        return build(config, family, dtype)

    return guarded


BROKEN_BASES = {  # how the demo copy is broken -> what the one line says
    "a missing tensor": (lambda m: drop_tensor(m, "model.layers.3.mlp.down_proj.weight"),
                         r"no tensor 'model\.layers\.3\.mlp\.down_proj\.weight'"),
    "a tensor of the wrong shape": (lambda m: edit_header(m, lambda h: h["model.layers.1.mlp.down_proj.weight"]
                                                          .update(shape=[512, 256])),
                                    r"model\.layers\.1\.mlp\.down_proj\.weight is \[512, 256\] in the checkpoint, "
                                    r"config\.json makes it \[256, 512\]"),
    "float8 weights": (lambda m: edit_header(m, lambda h: h["model.norm.weight"].update(dtype="F8_E4M3",
                                                                                        shape=[512])),
                       r"model\.norm\.weight' is F8_E4M3, which qvlquant does not read"),
    "integer weights": (lambda m: edit_header(m, lambda h: h["model.norm.weight"].update(dtype="I16")),
                        r"model\.norm\.weight is I16 \(torch\.int16\) in the checkpoint; weights must be floating"),
    "vocab_size": (lambda m: edit_text_config(m, vocab_size=2000),
                   r"config\.json: vocab_size is 2000, but model\.embed_tokens\.weight has 2008 rows"),
    "vocab_size beyond the checkpoint": (lambda m: edit_text_config(m, vocab_size=3000),
                                         r"config\.json: vocab_size is 3000, larger than any dimension"),
    "zero layers": (lambda m: edit_text_config(m, num_hidden_layers=0, layer_types=[]),
                    r"num_hidden_layers must be a whole number of at least 1, got 0"),
    "fewer layers than the checkpoint": (lambda m: edit_text_config(m, num_hidden_layers=3,
                                                                    layer_types=["full_attention"] * 3),
                                         r"config\.json: num_hidden_layers is 3, but the checkpoint holds 4 decoder "
                                         r"layers"),
    "100000 layers": (lambda m: edit_json(m / "config.json", lambda c: (c["text_config"].pop("layer_types"),
                                                                        c["text_config"].update(
                                                                            num_hidden_layers=100000))),
                      r"num_hidden_layers is 100000, but the checkpoint holds 4 decoder layers"),
    "100000 vision blocks": (lambda m: edit_json(m / "config.json", lambda c: c["vision_config"].update(depth=100000)),
                             r"vision_config\.depth is 100000, more blocks than the 31 tensors"),
    "a size no tensor has": (lambda m: edit_json(m / "config.json", lambda c: c["vision_config"].update(
        temporal_patch_size=100000)), r"vision_config\.temporal_patch_size is 100000, larger than any dimension of "
                                     r"the checkpoint's tensors \(at most 2008\)"),
    "patch_size 0": (lambda m: edit_json(m / "config.json", lambda c: c["vision_config"].update(patch_size=0)),
                     r"config\.json: vision_config\.patch_size must be a whole number of at least 1, got 0"),
    "config.json a list": (lambda m: (m / "config.json").write_text("[1, 2]"),
                           r"config\.json: not a JSON object"),
    "text_config a list": (lambda m: edit_json(m / "config.json", lambda c: c.update(text_config=[1])),
                           r"config\.json: transformers cannot read it \(.*text_config"),
    "hidden_size a string": (lambda m: edit_text_config(m, hidden_size="256"),
                             r"config\.json: transformers cannot read it \(.*hidden_size"),
    "model_type a list": (lambda m: edit_json(m / "config.json", lambda c: c.update(model_type=["qwen2_vl"])),
                          r"config\.json: model_type must be a string, got \['qwen2_vl'\]"),
    "tokenizer_config.json a list": (lambda m: (m / "tokenizer_config.json").write_text("[1]"),
                                     r"tokenizer_config\.json: not a JSON object"),
    "the image processor's patch_size 0": (lambda m: edit_json(m / "processor_config.json",
                                                               lambda c: c["image_processor"].update(patch_size=0)),
                                           r"the image processor's patch_size must be a whole number of at least 1"),
    "the image processor a list": (lambda m: edit_json(m / "processor_config.json",
                                                       lambda c: c.update(image_processor=[1])),
                                   r"the processor files of .*: transformers cannot read it"),
    "an empty safetensors": (lambda m: (m / "model.safetensors").write_bytes(b""),
                             r"model\.safetensors: 0 bytes; a safetensors file starts"),
    "an index a list": (lambda m: ((m / "model.safetensors.index.json").write_text("[1]"),
                                   (m / "model.safetensors").rename(m / "model-1.safetensors")),
                        r"index\.json: not a JSON object with a weight_map"),
}


@pytest.mark.parametrize("fault", list(BROKEN_BASES))
def test_broken_base_models_are_refused_before_calibration(tmp_path, capsys, monkeypatch, deadline, fault):
    """Each fault of the base model's files is found by the checks that need no data (the headers, config.json,
    the processor files): one line naming the file and the field, exit 2, before any calibration and nothing
    written."""
    base = demo_copy(tmp_path / "base")
    breaks, message = BROKEN_BASES[fault]
    breaks(base)
    monkeypatch.setattr(api, "_batches", no_calibration)
    monkeypatch.setattr(api, "build_skeleton", checked_first(api.build_skeleton))
    with deadline(60):  # 10**5 vision blocks took 5 minutes to build
        assert main(["quantize", "--model", str(base), "--num-samples", "2", "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.partial").exists()


@pytest.mark.parametrize("tensor,index", [("model.norm.weight", (3,)), ("model.embed_tokens.weight", (2000, 5))])
def test_nan_or_inf_in_an_unquantized_tensor_is_never_exported(tmp_path, capsys, tensor, index):
    """The final norm and an embedding row no calibration token uses are never computed with during quantization
    (the vision tower is, and the loop stops on its NaN, row 14): copied as they are into the export, so each
    tensor is checked finite there, naming it; nothing is published."""
    base = demo_copy(tmp_path / "base")
    set_values(base, tensor, index, float("nan") if tensor != "model.embed_tokens.weight" else float("inf"))
    assert main(["quantize", "--model", str(base), "--num-samples", "2", "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tensor} holds NaN or infinite values" in err, err
    assert not (tmp_path / "q").exists()
