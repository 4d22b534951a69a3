"""eval/photos.py: the held-out photographs are the real files the installed packages ship, each asked every
question in words the demo's tokenizer knows."""

import pathlib

import pytest

from qvlquant.calib.images import load_image
from qvlquant.eval import photos


def test_photos_are_real_bundled_files_with_every_question(demo):
    _, processor = demo
    items = photos.photo_items()
    paths = sorted({it.image_path for it in items})
    assert any(p.endswith("grace_hopper.jpg") for p in paths)  # matplotlib is in the test extra
    assert len(items) == len(paths) * len(photos.QUESTIONS)
    for p in paths:
        image = load_image(p)
        assert image.mode == "RGB" and min(image.size) >= 128  # photographs, not icons
    unk = processor.tokenizer.convert_tokens_to_ids("<unk>")
    for q in photos.QUESTIONS:
        assert unk not in processor.tokenizer(q, add_special_tokens=False)["input_ids"], q


def test_no_photos_is_an_error_naming_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(photos, "_package_dir", lambda name: pathlib.Path(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install scikit-image"):
        photos.photo_items()
