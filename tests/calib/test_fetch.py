"""URL images, only against a loopback server this test starts (bounded, stops by itself)."""

import http.server
import io
import threading
import time

import pytest
from PIL import Image

from qvlquant.calib.fetch import fetch
from qvlquant.calib.images import ImageError, load_image


def png():
    buf = io.BytesIO()
    Image.new("RGB", (9, 7), (0, 128, 255)).save(buf, format="PNG")
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path == "/ok.png":
            body = png()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.end_headers()
        elif self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/huge":
            self.send_response(200)
            self.end_headers()
            for _ in range(64):  # 4 MB, no Content-Length
                self.wfile.write(b"\0" * 65536)
        elif self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_urls_off_by_default_and_private_addresses_refused(server):
    with pytest.raises(ImageError, match="network images are off"):
        load_image(server + "/ok.png")
    with pytest.raises(ImageError, match="private, loopback or link-local"):
        load_image(server + "/ok.png", allow_urls=True)
    with pytest.raises(ImageError, match="169.254.169.254.*refused"):
        fetch("http://169.254.169.254/latest/meta-data/")
    with pytest.raises(ImageError, match="only http"):
        fetch("ftp://127.0.0.1/x")


def test_fetch_and_redirects_rechecked(server):
    img = load_image(server + "/ok.png", allow_urls=True, allow_private_urls=True)
    assert img.size == (9, 7) and img.getpixel((0, 0)) == (0, 128, 255)
    assert fetch(server + "/redirect", allow_private=True) == png()
    with pytest.raises(ImageError, match="more than 3 redirects"):
        fetch(server + "/loop", allow_private=True)


def test_redirect_to_metadata_address_refused_even_when_loopback_is_allowed(server, monkeypatch):
    import qvlquant.calib.fetch as f

    real = f._check_host

    def check(host, port, allow_private):  # loopback allowed for the test server, link-local still refused
        return real(host, port, allow_private and host == "127.0.0.1")

    monkeypatch.setattr(f, "_check_host", check)
    with pytest.raises(ImageError, match="169.254.169.254"):
        fetch(server + "/to-metadata", allow_private=True)


def test_size_cap_timeout_and_errors(server):
    with pytest.raises(ImageError, match="over the 1048576-byte cap"):
        fetch(server + "/huge", max_bytes=1 << 20, allow_private=True)
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="within 1 s"):
        fetch(server + "/slow", timeout=1.0, allow_private=True)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ImageError, match="HTTP 404"):
        fetch(server + "/missing", allow_private=True)
