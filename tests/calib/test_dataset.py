import json

import pytest
from PIL import Image

from qvlquant.calib.dataset import (
    CalibConfig,
    CalibrationError,
    build_batches,
    encode_sample,
    image_files,
)
from qvlquant.calib.sources import load_samples


def chat(image, text="what color is the shape?", answer="blue", **image_kw):
    return [
        {"role": "user", "content": [{"type": "image", "image": image, **image_kw}, {"type": "text", "text": text}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def test_chat_sample_becomes_a_real_multimodal_batch(demo):
    _, processor = demo
    enc = encode_sample(processor, chat(Image.new("RGB", (112, 112), (255, 0, 0))), CalibConfig(), "s0")
    assert set(enc) >= {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_visual = int((enc["input_ids"] == image_id).sum())
    assert n_visual == int(enc["image_grid_thw"].prod()) // 4 == int(enc["mm_token_type_ids"].sum())


def test_pixel_budget_bounds_visual_tokens(demo):
    _, processor = demo
    big = Image.new("RGB", (1000, 800))
    small = encode_sample(processor, chat(big), CalibConfig(max_pixels=112 * 112), "s")
    assert int(small["image_grid_thw"].prod()) // 4 <= 16
    # a per-image max_pixels above the global budget is clamped to it
    clamped = encode_sample(processor, chat(big, max_pixels=1e12), CalibConfig(max_pixels=112 * 112), "s")
    assert clamped["image_grid_thw"].tolist() == small["image_grid_thw"].tolist()


def test_long_sample_refused_never_truncated(demo):
    _, processor = demo
    with pytest.raises(CalibrationError, match=r"sample 7: \d+ tokens, over max_length 20.*never truncated"):
        encode_sample(processor, chat(Image.new("RGB", (112, 112))), CalibConfig(max_length=20), "sample 7")


@pytest.mark.parametrize("text", ["<|image_pad|> sneaky", "hi <|vision_start|>", "<|im_end|>"])
def test_reserved_markers_in_text_refused(demo, text):
    _, processor = demo
    with pytest.raises(CalibrationError, match="reserved marker"):
        encode_sample(processor, chat(Image.new("RGB", (8, 8)), text=text), CalibConfig(), "s")
    with pytest.raises(CalibrationError, match="reserved marker"):
        encode_sample(processor, text, CalibConfig(), "s")


def test_bad_samples_name_themselves(demo, tmp_path):
    _, processor = demo
    with pytest.raises(CalibrationError, match="s3: .*does not exist"):
        encode_sample(processor, chat(str(tmp_path / "nope.png")), CalibConfig(), "s3")
    with pytest.raises(CalibrationError, match="s4: message 1 needs .role. and .content."):
        encode_sample(processor, [{"content": "x"}], CalibConfig(), "s4")
    with pytest.raises(CalibrationError, match="empty"):
        build_batches(processor, [], CalibConfig())


def test_padded_batches_and_text_samples(demo):
    _, processor = demo
    samples = [chat(Image.new("RGB", (112, 112))), "plain text sample of natural language", chat(Image.new("RGB", (56, 224)))]
    batches = build_batches(processor, samples, CalibConfig(batch_size=2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    first = batches[0]
    assert first["image_grid_thw"].shape[0] == 1  # the text sample brings no image
    lengths = first["attention_mask"].sum(1)
    assert lengths[1] < first["input_ids"].shape[1]  # right padding, masked out
    assert (first["input_ids"][1, lengths[1]:] == processor.tokenizer.pad_token_id).all()


def test_json_sources_with_relative_images(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "img" / "a.png")
    rows = [chat("img/a.png"), {"messages": chat("img/a.png", answer="red")}, "some text"]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    samples, names, root = load_samples(str(tmp_path / "c.json"), 3)
    assert len(samples) == 3 and root == str(tmp_path) and all(n.startswith("c.json[") for n in names)
    with pytest.raises(CalibrationError, match="holds 3 samples, fewer than --num-samples 4"):
        load_samples(str(tmp_path / "c.json"), 4)
    (tmp_path / "bad.jsonl").write_text('[{"role": "user", "content": "hi"}]\n{oops\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:2: invalid JSON"):
        load_samples(str(tmp_path / "bad.jsonl"), 1)
    with pytest.raises(CalibrationError, match="pickle"):
        load_samples(str(tmp_path / "x.bin"), 1)


def test_video_frames_sample(demo, tmp_path):
    from qvlquant.engine.loop import capture_inputs
    from qvlquant.families import QWEN2_VL

    model, processor = demo
    frames = []
    for i in range(4):
        Image.new("RGB", (112, 112), (60 * i, 0, 0)).save(tmp_path / f"f{i}.png")
        frames.append(f"f{i}.png")
    sample = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "what moves?"}]},
              {"role": "assistant", "content": "the shape"}]
    batch = build_batches(processor, [sample, chat(Image.new("RGB", (112, 112)))],
                          CalibConfig(image_root=str(tmp_path), batch_size=2, max_pixels=112 * 112))[0]
    assert batch["video_grid_thw"].tolist() == [[2, 8, 8]] and batch["image_grid_thw"].shape[0] == 1
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((batch["input_ids"] == video_id).sum()) == 2 * 8 * 8 // 4
    assert capture_inputs(model, QWEN2_VL, [batch])[0].hidden.shape[0] == 2
    with pytest.raises(CalibrationError, match="non-empty list of frames"):
        build_batches(processor, [[{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}]], CalibConfig())


def test_frame_and_image_counts_are_checked_before_any_image_loads(demo, monkeypatch):
    """A 1,500-frame video took 12.8 GiB before "over max_length": each frame pair and each image costs at least
    min_pixels / (patch * merge)**2 visual tokens (4 for the demo's 14-pixel patches, 2x2 merge, 3136 pixels), so the
    count alone decides. The files do not exist: a load would say so."""
    import qvlquant.calib.dataset as dataset

    _, processor = demo
    monkeypatch.setattr(dataset, "load_image", lambda *a, **k: pytest.fail("an image was loaded"))
    video = [{"role": "user", "content": [{"type": "video", "video": [f"f{i}.png" for i in range(1500)]},
                                          {"type": "text", "text": "what moves?"}]}]
    with pytest.raises(CalibrationError, match=r"^clip 3: 1500 video frames and 0 images need at least 3000 visual "
                                               r"tokens, over max_length 2048; use fewer frames"):
        encode_sample(processor, video, CalibConfig(), "clip 3")
    album = [{"role": "user", "content": [{"type": "image", "image": f"{i}.png"} for i in range(600)]}]
    with pytest.raises(CalibrationError, match=r"^album: 0 video frames and 600 images need at least 2400 visual"):
        encode_sample(processor, album, CalibConfig(), "album")


def test_image_files_lists_every_local_file_the_samples_name_unopened(tmp_path):
    """What --output may never replace (RELIABILITY.md 46): images, image_url items, video frames, file:// URIs,
    relative to the root; nothing for data URIs, URLs, PIL images or text. None of the files needs to exist."""
    video = {"type": "video", "video": ["v/0.png", str(tmp_path / "abs.png")]}
    samples = [chat("a.png"), chat(f"file://{tmp_path}/b.png"), chat("data:image/png;base64,AAAA"),
               chat("https://example.com/c.png"), chat(Image.new("RGB", (4, 4))), "plain text",
               [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "d.png"}}, video]}]]
    assert image_files(samples, str(tmp_path / "root")) == [
        tmp_path / "root" / "a.png", tmp_path / "b.png", tmp_path / "root" / "d.png", tmp_path / "root" / "v" / "0.png",
        tmp_path / "abs.png"]
