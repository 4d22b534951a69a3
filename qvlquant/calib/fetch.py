"""Fetching an image URL, only when the user opted in: http(s) only, private / loopback / link-local addresses refused
(each redirect re-checked, and the connection goes to the address that was checked, https included), a byte cap on the
body, and one deadline for the whole download: the name lookup, the connects, every redirect, the headers and the body
together. A per-read socket timeout is not enough (a server dripping one byte a second never trips it), so a watchdog
shuts the socket down when the deadline passes."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
import time
import urllib.parse

from qvlquant.calib.errors import ImageError

MAX_URL_BYTES = 32 * 1024 * 1024
MAX_REDIRECTS = 3


class _Deadline:
    def __init__(self, timeout: float):
        self.timeout, self.end = timeout, time.monotonic() + timeout

    def left(self, url: str) -> float:
        """Seconds left, or the timeout error once there are none."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.error(url)
        return left

    def error(self, url: str) -> ImageError:
        return ImageError(f"image URL {url!r}: no complete answer within {self.timeout:g} s")


def _lookup(host: str, port: int, deadline: _Deadline) -> list[str]:
    """getaddrinfo has no timeout of its own: it runs in a daemon thread that is abandoned at the deadline."""
    result: dict = {}

    def run():
        try:
            result["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(max(0.0, deadline.end - time.monotonic()))
    if thread.is_alive():
        raise ImageError(f"cannot resolve {host!r} within {deadline.timeout:g} s")
    if "error" in result:
        raise ImageError(f"cannot resolve {host!r}: {result['error']}")
    return sorted({info[4][0] for info in result["infos"]})


def _check_host(host: str, port: int, allow_private: bool, deadline: _Deadline) -> str:
    """Resolve ``host`` and refuse non-public addresses. -> the address to connect to (no second lookup)."""
    addresses = _lookup(host, port, deadline)
    for addr in addresses:
        ip = ipaddress.ip_address(addr.split("%")[0])
        if not allow_private and not ip.is_global:
            raise ImageError(f"{host!r} resolves to {addr}, a private, loopback or link-local address: refused")
    return addresses[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to the checked address; the host name is still used for SNI and the certificate check."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)  # visible to the watchdog
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


class _Watchdog:
    """Shuts the connection's socket down after ``seconds``: a blocked connect, TLS handshake or read returns at once.
    The socket is also held here once connected: http.client drops ``conn.sock`` when a response will close it,
    while the response still reads from it."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float):
        self.conn, self.sock, self.fired = conn, None, threading.Event()
        self.timer = threading.Timer(seconds, self.cut)
        self.timer.daemon = True
        self.timer.start()

    def connected(self):
        self.sock = self.conn.sock

    def cut(self):
        self.fired.set()
        for sock in {self.conn.sock, self.sock} - {None}:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's method, under TLS too
            except OSError:
                pass


def _read_body(resp: http.client.HTTPResponse, url: str, max_bytes: int) -> bytes:
    declared = resp.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image URL {url!r}: {declared} bytes, over the {max_bytes}-byte cap")
    body = bytearray()
    while chunk := resp.read1(65536):
        body += chunk
        if len(body) > max_bytes:
            raise ImageError(f"image URL {url!r}: body over the {max_bytes}-byte cap")
    return bytes(body)


def _get(url: str, parts: urllib.parse.SplitResult, address: tuple[str, int], deadline: _Deadline,
         max_bytes: int) -> tuple[str | None, bytes]:
    """One request to the checked (address, port). -> (redirect location or None, body)."""
    (address, port), left = address, deadline.left(url)
    if parts.scheme == "https":
        conn = _PinnedHTTPS(parts.hostname, address, port, timeout=left)
    else:
        conn = http.client.HTTPConnection(address, port, timeout=left)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    watchdog = _Watchdog(conn, left)
    try:
        conn.connect()
        watchdog.connected()
        if watchdog.fired.is_set():  # it went off while the socket was being made
            raise deadline.error(url)
        conn.request("GET", path, headers={"Host": parts.netloc, "User-Agent": "qvlquant"})
        resp = conn.getresponse()
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.getheader("Location")
            if not location:
                raise ImageError(f"image URL {url!r}: redirect without a Location")
            return location, b""
        if resp.status != 200:
            raise ImageError(f"image URL {url!r}: HTTP {resp.status}")
        body = _read_body(resp, url, max_bytes)
    except (OSError, http.client.HTTPException) as e:
        if watchdog.fired.is_set():
            raise deadline.error(url) from None
        raise ImageError(f"image URL {url!r}: {type(e).__name__}: {e}") from None
    finally:
        watchdog.timer.cancel()
        conn.close()
    if watchdog.fired.is_set():  # a cut socket reads as the end of a body without Content-Length
        raise deadline.error(url)
    return None, body


def fetch(url: str, timeout: float = 10.0, max_bytes: int = MAX_URL_BYTES, allow_private: bool = False) -> bytes:
    """The body of ``url``; ``timeout`` bounds the whole call, redirects included."""
    deadline = _Deadline(timeout)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageError(f"image URL {url!r}: only http(s) URLs with a host are fetched")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:  # urllib's message for a port that is not a number or out of range
            raise ImageError(f"image URL {url!r}: the port is not a number from 1 to 65535") from None
        address = _check_host(parts.hostname, port, allow_private, deadline)
        location, body = _get(url, parts, (address, port), deadline, max_bytes)
        if location is None:
            return body
        url = urllib.parse.urljoin(url, location)
    raise ImageError(f"image URL {url!r}: more than {MAX_REDIRECTS} redirects")
