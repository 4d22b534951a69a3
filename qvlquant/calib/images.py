"""qvlquant's own image loader: local files and data URIs, checked before they are opened; http(s) URLs only when the
user opts in.

qwen_vl_utils fetches any URL with no timeout or size cap. Here network images are off by default; with ``allow_urls``
they go through ``calib.fetch`` (http(s) only, public addresses only, every redirect re-checked, one deadline for the
whole download, a byte cap). The bytes must be one of a few common raster formats (ALLOWED_FORMATS), whatever the
name says: EPS, PostScript and the rarer PIL plugins are refused before any of them parses the file. A path is
resolved (symlinks included) and must stay inside the allowed root; it must be a regular file; the decode is forced
at load so a truncated or fake image fails here, naming the file; decompression bombs are errors; every image is
normalised to 8-bit RGB with its EXIF orientation applied.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import pathlib
import stat
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from qvlquant.calib.errors import ImageError
from qvlquant.calib.fetch import fetch

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_DATA_URI_BYTES = 32 * 1024 * 1024
MAX_ASPECT_RATIO = 200  # the Qwen2-VL image processor refuses more
# The formats an image may be, decided from its bytes (PIL tries only these plugins), never from its name or a data
# URI's claimed type. Each is a raster format decoded inside the process by a library in wide use; everything else is
# refused, above all EPS / PostScript, whose PIL plugin starts Ghostscript (an interpreter of the file) even to ask
# its version, and the long tail of rarely exercised plugins.
ALLOWED_FORMATS = (
    "PNG",  # lossless: screenshots, charts, what dataset tools write
    "JPEG",  # photographs (a phone's MPO opens as its first JPEG)
    "GIF",  # web images and animations (the first frame is used)
    "BMP",  # uncompressed bitmaps
    "WEBP",  # the web's current format (libwebp)
    "TIFF",  # scans and document images (libtiff)
)
# Signatures of non-image files people hand in as images that PIL cannot name (it only writes PDF).
OTHER_SIGNATURES = {b"%PDF-": "PDF"}


def _check_path(path: str | os.PathLike, root: str | os.PathLike | None) -> pathlib.Path:
    shown = str(path)
    try:
        resolved = pathlib.Path(path).resolve()
        root_resolved = None if root is None else pathlib.Path(root).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop is a RuntimeError before Python 3.13
        raise ImageError(f"image {shown!r} cannot be opened: {getattr(e, 'strerror', None) or e}") from None
    if root_resolved is not None and resolved != root_resolved and root_resolved not in resolved.parents:
        raise ImageError(f"image {shown!r} resolves to {resolved}, outside the allowed root {root_resolved}")
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        raise ImageError(f"image {shown!r} does not exist") from None
    except OSError as e:  # a name too long, a loop, a path through a file
        raise ImageError(f"image {shown!r} cannot be opened: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"image {shown!r} is not a regular file")
    if st.st_size == 0:
        raise ImageError(f"image {shown!r} is empty")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(f"image {shown!r} is {st.st_size} bytes, over the {MAX_FILE_BYTES}-byte cap")
    return resolved


def detected_format(data: bytes) -> str | None:
    """The format ``data``'s first bytes claim to be, by each PIL plugin's signature check (no plugin opens it)."""
    Image.init()
    prefix = data[:16]
    for signature, kind in OTHER_SIGNATURES.items():
        if prefix.startswith(signature):
            return kind
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        result = accept(prefix) if accept is not None else None
        if result and not isinstance(result, str):  # a str is PIL's "looks like it, but unsupported" note
            return fmt
    return None


def _refused_format(data: bytes, name: str) -> ImageError:
    fmt, allowed = detected_format(data), ", ".join(ALLOWED_FORMATS)
    if fmt is None or fmt in ALLOWED_FORMATS:
        return ImageError(f"image {name!r} cannot be decoded: its bytes are none of the allowed image formats "
                          f"({allowed})")
    return ImageError(f"image {name!r} is {fmt}, not one of the allowed image formats ({allowed}); convert it to PNG "
                      "or JPEG")


def _decode(data: bytes, name: str) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            img.load()  # force the decode: truncated files fail here, not later
        except UnidentifiedImageError:
            raise _refused_format(data, name) from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ImageError(f"image {name!r} is too large to decode safely: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"image {name!r} cannot be decoded: {e}") from None
    return normalise(img, name)


def normalise(img: Image.Image, name: str = "<image>") -> Image.Image:
    """First frame, EXIF rotation applied, 8-bit RGB (alpha composited on white)."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    w, h = img.size
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ImageError(f"image {name!r} is {w}x{h}: aspect ratio over {MAX_ASPECT_RATIO} is not supported")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _data_uri(uri: str) -> Image.Image:
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:image/") or ";base64" not in header:
        raise ImageError(f"data URI {uri[:40]!r}... is not a base64 image (expected data:image/...;base64,...)")
    if len(payload) * 3 // 4 > MAX_DATA_URI_BYTES:
        raise ImageError(f"data URI image is over the {MAX_DATA_URI_BYTES}-byte cap")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("data URI holds invalid base64") from None
    return _decode(data, "data URI")


def local_path(source, root: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The file an image source names (a path, or a ``file://`` URI, joined to ``root`` when relative), unchecked
    and unopened; None for anything else (a PIL image, a data URI, a URL)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    text = os.fspath(source)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif text.startswith("data:") or "://" in text:
        return None
    path = pathlib.Path(text)
    return pathlib.Path(root) / path if root is not None and not path.is_absolute() else path


def load_image(source, root: str | os.PathLike | None = None, allow_urls: bool = False,
               allow_private_urls: bool = False) -> Image.Image:
    """An RGB image from a PIL image, a local path, a ``file://`` URI or a base64 data URI; an http(s) URL only with
    ``allow_urls`` (then fetched by qvlquant.calib.fetch: timeout, byte cap, no private addresses unless
    ``allow_private_urls``, which exists for tests against a loopback server).

    ``root``: relative paths are taken from it and no path may leave it.
    """
    if isinstance(source, Image.Image):
        return normalise(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"image must be a path, a file:// or data: URI, or a PIL image, got {type(source).__name__}")
    text = os.fspath(source)
    if text.startswith("data:"):
        return _data_uri(text)
    if text.startswith(("http://", "https://")):
        if not allow_urls:
            raise ImageError(f"image {text!r} is a URL: network images are off (--allow-urls turns them on)")
        return _decode(fetch(text, allow_private=allow_private_urls), text)
    if "://" in text and not text.startswith("file://"):
        raise ImageError(f"image {text!r} has an unsupported scheme; use a local path, file:// or data:")
    path = local_path(text, root)
    resolved = _check_path(path, root)
    try:
        data = resolved.read_bytes()
    except OSError as e:
        raise ImageError(f"image {str(path)!r} cannot be read: {e.strerror}") from None
    return _decode(data, text)
