"""Fetching an image URL, only when the user opted in: http(s) only, private / loopback / link-local addresses refused
(each redirect re-checked), a connect/read timeout, an overall deadline, and a byte cap on the body."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
import urllib.parse

from qvlquant.calib.images import ImageError

MAX_URL_BYTES = 32 * 1024 * 1024
MAX_REDIRECTS = 3


def _check_host(host: str, port: int, allow_private: bool) -> str:
    """Resolve ``host`` and refuse non-public addresses. -> the address to connect to (no second lookup)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ImageError(f"cannot resolve {host!r}: {e}") from None
    addresses = sorted({info[4][0] for info in infos})
    for addr in addresses:
        ip = ipaddress.ip_address(addr.split("%")[0])
        if not allow_private and not ip.is_global:
            raise ImageError(f"{host!r} resolves to {addr}, a private, loopback or link-local address: refused")
    return addresses[0]


def fetch(url: str, timeout: float = 10.0, max_bytes: int = MAX_URL_BYTES, allow_private: bool = False) -> bytes:
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageError(f"image URL {url!r}: only http(s) URLs with a host are fetched")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _check_host(parts.hostname, port, allow_private)
        if parts.scheme == "https":  # TLS needs the name for SNI and the certificate check
            conn = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout)
        else:  # connect to the address that was checked, not to a second DNS answer
            conn = http.client.HTTPConnection(address, port, timeout=timeout)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", path, headers={"Host": parts.netloc, "User-Agent": "qvlquant"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise ImageError(f"image URL {url!r}: redirect without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if resp.status != 200:
                raise ImageError(f"image URL {url!r}: HTTP {resp.status}")
            declared = resp.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ImageError(f"image URL {url!r}: {declared} bytes, over the {max_bytes}-byte cap")
            body = bytearray()
            while True:
                if time.monotonic() > deadline:
                    raise ImageError(f"image URL {url!r}: no complete answer within {timeout:g} s")
                chunk = resp.read(65536)
                if not chunk:
                    return bytes(body)
                body += chunk
                if len(body) > max_bytes:
                    raise ImageError(f"image URL {url!r}: body over the {max_bytes}-byte cap")
        except (OSError, http.client.HTTPException) as e:
            raise ImageError(f"image URL {url!r}: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
    raise ImageError(f"image URL {url!r}: more than {MAX_REDIRECTS} redirects")
