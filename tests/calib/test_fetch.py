"""URL images, only against a loopback server this test starts (bounded, stops by itself)."""

import http.server
import io
import socket
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
        elif self.path == "/drip":  # one byte every 0.1 s for 20 s: each read returns before any per-read timeout
            self.send_response(200)
            self.end_headers()
            self.drip(b"\0" * 200)
        elif self.path == "/drip-headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self.drip(b"X-Slow: " + b"a" * 200)
        else:
            self.send_response(404)
            self.end_headers()


    def drip(self, data):
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the client gave up: that is the point
            pass


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

    def check(host, port, allow_private, deadline):  # loopback allowed for the test server, link-local still refused
        return real(host, port, allow_private and host == "127.0.0.1", deadline)

    monkeypatch.setattr(f, "_check_host", check)
    with pytest.raises(ImageError, match="169.254.169.254"):
        fetch(server + "/to-metadata", allow_private=True)


def test_size_cap_timeout_and_errors(server):
    with pytest.raises(ImageError, match="over the 1048576-byte cap"):
        fetch(server + "/huge", max_bytes=1 << 20, allow_private=True)
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="within 1 s"):
        fetch(server + "/slow", timeout=1.0, allow_private=True)
    assert time.monotonic() - t0 < 1.8
    with pytest.raises(ImageError, match="HTTP 404"):
        fetch(server + "/missing", allow_private=True)


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_timeout_bounds_the_whole_download_not_each_read(server, path):
    """A server dripping one byte every 0.1 s (body or headers) held a 3 s timeout for the whole 20 s drip."""
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=r"no complete answer within 1 s"):
        fetch(server + path, timeout=1.0, allow_private=True)
    assert 0.9 < time.monotonic() - t0 < 1.8


def test_timeout_bounds_a_slow_name_lookup(monkeypatch):
    def slow_lookup(*args, **kwargs):
        time.sleep(3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]

    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=r"cannot resolve 'slow\.example' within 0\.5 s"):
        fetch("http://slow.example/x.png", timeout=0.5, allow_private=True)
    assert time.monotonic() - t0 < 1.2


def test_https_dials_the_checked_address_without_a_second_lookup(monkeypatch):
    """A second lookup could answer with a private address after the check passed (DNS rebinding)."""
    real, looked_up, accepted = socket.getaddrinfo, [], []

    def counting(host, *args, **kwargs):
        looked_up.append(host)
        return real(host, *args, **kwargs)

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def accept_and_hang_up():
        conn, _ = listener.accept()
        accepted.append(conn.getsockname()[0])
        conn.close()

    threading.Thread(target=accept_and_hang_up, daemon=True).start()
    monkeypatch.setattr(socket, "getaddrinfo", counting)
    try:
        with pytest.raises(ImageError, match=r"image URL 'https://localhost:\d+/x.png': \w+Error"):
            fetch(f"https://localhost:{listener.getsockname()[1]}/x.png", timeout=3.0, allow_private=True)
    finally:
        listener.close()
    assert looked_up.count("localhost") == 1 and accepted == ["127.0.0.1"]


def test_bad_port_is_an_image_error():
    with pytest.raises(ImageError, match="the port is not a number"):
        fetch("http://127.0.0.1:99999/x.png", allow_private=True)
