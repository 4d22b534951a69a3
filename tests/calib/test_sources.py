import json

import pytest
from PIL import Image

from qvlquant.calib.dataset import CalibConfig, CalibrationError, build_batches
from qvlquant.calib.sources import from_sharegpt, load_samples


@pytest.fixture
def images(tmp_path):
    (tmp_path / "img").mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (64, 48), color).save(tmp_path / "img" / f"{i}.png")
    return tmp_path


def test_sharegpt_rows(images):
    rows = [
        {"conversations": [{"from": "human", "value": "<image>What color?"}, {"from": "gpt", "value": "red"}],
         "images": ["img/0.png"]},
        {"messages": [{"role": "user", "content": "Compare <image> and <image>."}, {"role": "assistant", "content": "two"}],
         "images": ["img/1.png", "img/2.png"]},
        {"text": "plain text sample"},
    ]
    (images / "sg.json").write_text(json.dumps(rows))
    samples, names, root = load_samples(str(images / "sg.json"), 3, seed=0)
    assert root == str(images)
    by_name = dict(zip(names, samples))
    two = by_name["sg.json[1]"][0]["content"]
    assert [c.get("image", c.get("text")) for c in two] == ["Compare ", "img/1.png", " and ", "img/2.png", "."]
    assert by_name["sg.json[2]"] == "plain text sample"


def test_sharegpt_placeholder_count_checked():
    with pytest.raises(CalibrationError, match="row 3: 2 <image> placeholders but 1 images"):
        from_sharegpt({"messages": [{"role": "user", "content": "<image><image>"}], "images": ["a.png"]}, "row 3")
    with pytest.raises(CalibrationError, match="unknown role 'robot'"):
        from_sharegpt({"conversations": [{"from": "robot", "value": "hi"}]}, "row 4")


def test_multi_image_sample_becomes_one_batch(demo, images):
    _, processor = demo
    sample = from_sharegpt({"messages": [{"role": "user", "content": "<image> vs <image>"},
                                          {"role": "assistant", "content": "x"}], "images": ["img/0.png", "img/1.png"]}, "s")
    batch = build_batches(processor, [sample], CalibConfig(image_root=str(images), max_pixels=112 * 112))[0]
    assert batch["image_grid_thw"].shape[0] == 2
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == pad).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4


def test_image_folder_with_captions(images):
    (images / "img" / "captions.jsonl").write_text("\n".join(json.dumps({"image": f"{i}.png", "caption": f"c{i}"}) for i in range(3)))
    samples, names, root = load_samples(str(images / "img"), 2, seed=1)
    assert root == str(images / "img") and len(samples) == 2
    assert samples[0][0]["content"][1]["text"] == "Describe this image." and samples[0][1]["content"][0]["text"].startswith("c")
    (images / "img" / "captions.jsonl").unlink()
    (images / "img" / "captions.tsv").write_text("0.png\tred square\nbroken line\n")
    with pytest.raises(CalibrationError, match="captions.tsv:2: expected file<TAB>caption"):
        load_samples(str(images / "img"), 1)


def test_hf_dataset_saved_to_disk(tmp_path, demo):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "picture": [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(4)],
        "q": [f"question {i}" for i in range(4)],
        "a": [f"answer {i}" for i in range(4)],
    }).cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    cols = {"image": "picture", "question": "q", "answer": "a"}
    samples, names, _ = load_samples(f"hf:{tmp_path / 'ds'}", 3, seed=0, columns=cols)
    assert len(samples) == 3 and names[0].startswith("hf:")
    assert samples[0][0]["content"][0]["image"].startswith("data:image/")  # bytes, decoded by qvlquant's loader
    _, processor = demo
    assert len(build_batches(processor, samples, CalibConfig())) == 3
    with pytest.raises(CalibrationError, match=r"no column\(s\) \['missing', 'question', 'answer'\]; it has"):
        load_samples(f"hf:{tmp_path / 'ds'}", 1, columns={"image": "missing"})


def test_hf_dataset_images_go_through_the_allowlist_not_pil_plugins(tmp_path, demo, monkeypatch):
    """RELIABILITY.md: an EPS image cell in an hf: dataset is refused by qvlquant's loader; the datasets library,
    which opens image cells with every PIL plugin, never decodes it (Ghostscript would start)."""
    datasets = pytest.importorskip("datasets")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    ds = datasets.Dataset.from_dict({"picture": [{"bytes": eps, "path": None}], "q": ["what?"]})
    ds = ds.cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))

    def no_programs(*a, **k):
        raise AssertionError("a program was started")

    monkeypatch.setattr("subprocess.Popen", no_programs)
    cols = {"image": "picture", "question": "q", "answer": None, "text": None}
    samples, names, _ = load_samples(f"hf:{tmp_path / 'ds'}", 1, columns=cols)
    _, processor = demo
    with pytest.raises(CalibrationError, match=r"hf:.*row 0.*EPS, not one of the allowed image formats"):
        build_batches(processor, samples, CalibConfig(), names)


@pytest.mark.parametrize("source,asked,available", [("easyvqa", 10 ** 6, 38575), ("demo", 10 ** 4, 273)])
def test_more_samples_than_the_source_holds_names_the_flag(source, asked, available):
    """Not Python's "Sample larger than population": the flag, the number asked and the number available."""
    with pytest.raises(CalibrationError, match=rf"--num-samples {asked}: .*holds at most {available}"):
        load_samples(source, asked)
    assert len(load_samples(source, available)[0]) == available  # the bound is exact


@pytest.mark.parametrize("n", [0, -1, 2.5, True, None, "3"])
def test_num_samples_must_be_a_positive_integer(n):
    with pytest.raises(CalibrationError, match=rf"--num-samples must be an integer >= 1, got {n!r}"):
        load_samples("demo", n)


def test_jsonl_rows_are_named_by_their_line_and_undecodable_files_by_their_path(tmp_path):
    (tmp_path / "c.jsonl").write_text('"first sample"\n\n{"messages": true}\n')
    with pytest.raises(CalibrationError, match=r"^c\.jsonl:3: 'messages' must be"):
        load_samples(str(tmp_path / "c.jsonl"), 1)
    (tmp_path / "latin1.json").write_bytes('["caf\xe9"]'.encode("latin-1"))
    with pytest.raises(CalibrationError, match=r"latin1\.json: not UTF-8 text \(byte 0xe9 at offset 5\)"):
        load_samples(str(tmp_path / "latin1.json"), 1)
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CalibrationError, match=r"deep\.json: invalid JSON \(nested too deeply\)"):
        load_samples(str(tmp_path / "deep.json"), 1)


def test_jsonl_lines_end_at_newlines_only(images):
    """U+2028, U+0085 (and U+2029, form feed) are valid raw inside a JSON string; ``str.splitlines`` would cut the
    row there. A CRLF file reads the same as an LF one."""
    texts = ["one\u2028two", "three\u0085four", "five\u2029six\x0cseven"]
    rows = "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n"
    (images / "c.jsonl").write_bytes(rows.encode("utf-8"))
    samples, names, _ = load_samples(str(images / "c.jsonl"), 3)
    assert dict(zip(names, samples)) == {f"c.jsonl:{i}": t for i, t in enumerate(texts, 1)}
    captions = "\r\n".join(json.dumps({"image": f"{i}.png", "caption": t}, ensure_ascii=False) for i, t in enumerate(texts))
    (images / "img" / "captions.jsonl").write_bytes(captions.encode("utf-8"))
    samples, names, _ = load_samples(str(images / "img"), 3)
    assert {n: s[1]["content"][0]["text"] for n, s in zip(names, samples)} == {
        f"captions.jsonl:{i}": t for i, t in enumerate(texts, 1)}


def test_a_jsonl_line_over_the_cap_is_refused_before_it_is_parsed(tmp_path):
    """A 50 MB line cost 5.7 GiB to parse; a line over 8 MiB is refused, read no further than the cap."""
    path = tmp_path / "c.jsonl"
    with open(path, "w") as f:
        f.write('"a short first sample"\n"' + "x" * (8 << 20) + '"\n')
    with pytest.raises(CalibrationError, match=rf"^calibration file {path}:2: the line is over the 8 MiB cap per line"):
        load_samples(str(path), 1)


@pytest.mark.parametrize("name,cap", [("c.json", "64 MiB"), ("c.jsonl", "1 GiB"), ("img/captions.jsonl", "1 GiB"),
                                      ("img/captions.tsv", "1 GiB")])
def test_calibration_files_over_the_cap_are_refused_unread(images, name, cap):
    path = images / name
    size = {"64 MiB": 64 << 20, "1 GiB": 1 << 30}[cap] + 1
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: only the size is claimed
    with pytest.raises(CalibrationError, match=rf"{path} is {size} bytes, over the {cap} cap"):
        load_samples(str(images / "img") if "/" in name else str(path), 1)


def test_a_bad_row_stops_the_read_at_that_row(tmp_path, monkeypatch):
    """Rows are checked as they are read: the error comes from the first bad row, and the rows after it are not
    parsed (a large file of bad rows is not held in memory first)."""
    import qvlquant.calib.sources as sources

    parsed = []
    real = sources._parse
    monkeypatch.setattr(sources, "_parse", lambda text, *a, **k: parsed.append(text) or real(text, *a, **k))
    (tmp_path / "c.jsonl").write_text('"ok"\n[[], []]\n' + '"later"\n' * 100)
    with pytest.raises(CalibrationError, match=r"c\.jsonl:2: message 1 is list"):
        load_samples(str(tmp_path / "c.jsonl"), 1)
    assert len(parsed) == 2
