import base64
import io
import os

import pytest
from PIL import Image

from qvlquant.calib.images import ImageError, load_image


def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_loads_rgb_from_path_and_file_uri(tmp_path):
    p = save(Image.new("RGB", (32, 20), (10, 200, 30)), tmp_path / "a.png")
    for src in (p, "file://" + p):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (32, 20) and img.getpixel((0, 0)) == (10, 200, 30)


def test_relative_path_taken_from_root(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "x.png")
    assert load_image("x.png", root=tmp_path).size == (8, 8)


def test_path_traversal_and_symlink_out_of_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    outside = save(Image.new("RGB", (8, 8)), tmp_path / "secret.png")
    with pytest.raises(ImageError, match="outside the allowed root"):
        load_image("../secret.png", root=root)
    with pytest.raises(ImageError, match="outside the allowed root"):
        load_image("/etc/passwd", root=root)
    os.symlink(outside, root / "link.png")
    with pytest.raises(ImageError, match="outside the allowed root"):
        load_image("link.png", root=root)


def test_not_regular_files(tmp_path):
    with pytest.raises(ImageError, match="not a regular file"):
        load_image("/dev/zero")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(str(tmp_path))
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(str(fifo))


def test_broken_files_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    good = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    for name, match in (("empty.png", "empty"), ("text.png", "cannot be decoded"), ("cut.png", "cannot be decoded"),
                        ("missing.png", "does not exist")):
        with pytest.raises(ImageError, match=match) as e:
            load_image(str(tmp_path / name))
        assert name in str(e.value)


def test_decompression_bomb_is_an_error(tmp_path):
    # a real PNG header claiming 100000 x 100000 pixels
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(ImageError, match="too large"):
        load_image(str(tmp_path / "bomb.png"))


def test_urls_and_unknown_schemes_refused():
    with pytest.raises(ImageError, match="network images are off"):
        load_image("http://127.0.0.1/x.png")
    with pytest.raises(ImageError, match="unsupported scheme"):
        load_image("ftp://host/x.png")
    with pytest.raises(ImageError, match="must be a path"):
        load_image(123)


def test_data_uris():
    ok = "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("RGB", (5, 7)))).decode()
    assert load_image(ok).size == (5, 7)
    with pytest.raises(ImageError, match="invalid base64"):
        load_image("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(ImageError, match="not a base64 image"):
        load_image("data:text/plain,hello")


def test_modes_are_normalised_deterministically(tmp_path):
    cmyk = load_image(save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0))[0] > 200
    sixteen = load_image(save(Image.new("I;16", (8, 8), 65535), tmp_path / "s.png"))
    assert sixteen.mode == "RGB" and sixteen.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert load_image(save(pal, tmp_path / "p.png")).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    gif = save(frames[0], tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert load_image(gif).getpixel((0, 0))[0] > 200  # first frame


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (40, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    p = save(img, tmp_path / "r.jpg", exif=exif)
    assert load_image(p).size == (10, 40)


def test_extreme_aspect_ratio_refused():
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(Image.new("RGB", (10000, 10)))
    assert load_image(Image.new("RGB", (1, 1))).size == (1, 1)


def test_unreadable_paths_are_image_errors_naming_the_file(tmp_path, monkeypatch):
    """A symlink loop, a name too long for the file system, a file that cannot be read: ImageError, not
    RuntimeError / OSError tracebacks."""
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    with pytest.raises(ImageError, match=r"a\.png' cannot be opened: .*[Ll]oop"):
        load_image("a.png", root=tmp_path)
    with pytest.raises(ImageError, match="cannot be opened.*too long"):
        load_image("x" * 300 + ".png", root=tmp_path)
    save(Image.new("RGB", (8, 8)), tmp_path / "locked.png")
    monkeypatch.setattr("pathlib.Path.read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(ImageError, match=r"locked\.png' cannot be read: Permission denied"):
        load_image("locked.png", root=tmp_path)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


@pytest.fixture
def no_programs(monkeypatch):
    """Starting any program (PIL's EPS plugin runs Ghostscript, even to ask its version) or parsing EPS at all fails
    the test; PIL's cached answer to "is Ghostscript installed" is reset so that it would ask again."""
    import subprocess

    from PIL import EpsImagePlugin

    def refuse(*args, **kwargs):
        raise AssertionError(f"a program was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", refuse)


def test_eps_named_png_is_refused_without_starting_ghostscript(tmp_path, no_programs):
    (tmp_path / "figure.png").write_bytes(EPS)
    with pytest.raises(ImageError, match=r"image '.*figure\.png' is EPS, not one of the allowed image formats "
                                         r"\(PNG, JPEG, GIF, BMP, WEBP, TIFF\)"):
        load_image(str(tmp_path / "figure.png"))


def test_eps_in_a_png_data_uri_is_refused_without_starting_ghostscript(no_programs):
    uri = "data:image/png;base64," + base64.b64encode(EPS).decode()
    with pytest.raises(ImageError, match=r"image 'data URI' is EPS, not one of the allowed image formats"):
        load_image(uri)


def test_refused_format_names_the_sample(tmp_path, no_programs):
    from qvlquant.calib.dataset import CalibConfig, CalibrationError, prepare_messages

    (tmp_path / "a.png").write_bytes(EPS)
    sample = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(CalibrationError, match=r"^rows\.jsonl:3: message 1 item 1: image 'a\.png' is EPS"):
        prepare_messages(sample, CalibConfig(image_root=str(tmp_path)), "rows.jsonl:3")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_allowed_formats_load_whatever_the_name(tmp_path, fmt, no_programs):
    path = tmp_path / "img.eps"  # the name is never read: the bytes decide
    Image.new("RGB", (12, 10), (250, 0, 0)).save(path, format=fmt)
    img = load_image(str(path))
    assert img.size == (12, 10) and img.getpixel((5, 5))[0] > 200


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX", "SGI", "QOI", "PDF"])
def test_other_formats_are_refused_naming_what_they_are(tmp_path, fmt, no_programs):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format=fmt)
    with pytest.raises(ImageError, match=rf"is {fmt}, not one of the allowed image formats"):
        load_image("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
