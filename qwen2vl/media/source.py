"""Where media comes from: paths, file:// and data: URIs, bytes, http(s), PIL images, arrays.

Everything here is untrusted input. Images are opened lazily (header only) so their size can be
refused before any pixels are decoded; remote reads are opt-in, time-limited and size-capped;
local reads can be confined to one directory (symlinks resolved first).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from qwen2vl.errors import MediaError

logger = logging.getLogger(__name__)

# 128 Mpx (about 384 MB as RGB). Pillow itself refuses twice its own 89 Mpx warning bound.
MAX_IMAGE_PIXELS = 128 * 1024 * 1024
MAX_REMOTE_IMAGE_BYTES = 64 * 1024 * 1024
MAX_REMOTE_VIDEO_BYTES = 1024 * 1024 * 1024
REMOTE_TIMEOUT_S = 30.0

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_EXIF_ORIENTATION = 0x0112


def read_source(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    *,
    allow_remote: bool = False,
    allowed_local_dir: str | os.PathLike | None = None,
    max_remote_bytes: int = MAX_REMOTE_IMAGE_BYTES,
) -> Path | bytes:
    """A checked local path, or the bytes behind a data: URI, an http(s) URL or raw bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, os.PathLike):
        return local_path(os.fspath(source), allowed_local_dir)
    if not isinstance(source, str):
        raise MediaError(f"unsupported media source of type {type(source).__name__}")
    if source.startswith("data:"):
        return decode_data_uri(source)
    if source.startswith(("http://", "https://")):
        if not allow_remote:
            raise MediaError(
                f"remote media refused: {source[:100]}; "
                "pass allow_remote=True to fetch http(s) URLs"
            )
        return fetch_remote(source, max_bytes=max_remote_bytes)
    if source.startswith("file://"):
        return local_path(_file_url_path(source), allowed_local_dir)
    if _SCHEME.match(source):
        raise MediaError(
            f"unsupported URL scheme in {source[:100]}; use a path, file://, data: or http(s)"
        )
    return local_path(source, allowed_local_dir)


def local_path(path: str, allowed_local_dir: str | os.PathLike | None = None) -> Path:
    """The resolved path of an existing file, inside allowed_local_dir when one is given."""
    try:
        resolved = Path(path).expanduser().resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise MediaError(f"cannot read media file {path!r}: {e}") from e
    if allowed_local_dir is not None:
        root = Path(allowed_local_dir).expanduser().resolve()
        if not resolved.is_relative_to(root):
            raise MediaError(f"media file {path!r} is outside the allowed directory {str(root)!r}")
    if not resolved.is_file():
        raise MediaError(f"media path {path!r} is not a regular file")
    return resolved


def decode_data_uri(uri: str) -> bytes:
    """Payload of a data: URI, base64 or percent-encoded (`data:image;base64,` works too)."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise MediaError("malformed data: URI (no comma before the payload)")
    if not header.endswith(";base64"):
        return urllib.parse.unquote_to_bytes(payload)
    payload = "".join(payload.split())
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data: URI holds invalid base64: {e}") from e


def fetch_remote(url: str, *, max_bytes: int, timeout_s: float = REMOTE_TIMEOUT_S) -> bytes:
    """GET url with a per-read timeout, a total deadline and a size cap."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "qwen2vl"})
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise MediaError(f"{url[:100]} is {declared} bytes, over the cap of {max_bytes}")
            while chunk := response.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise MediaError(f"{url[:100]} is over the cap of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise MediaError(f"{url[:100]} took over {timeout_s:.0f} s to download")
                chunks.append(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise MediaError(f"cannot fetch {url[:100]}: {e}") from e
    return b"".join(chunks)


def _file_url_path(url: str) -> str:
    # qwen-vl-utils strips the scheme and keeps the rest verbatim; proper URLs percent-encode.
    raw = url[len("file://") :]
    return raw if os.path.exists(raw) else urllib.parse.unquote(raw)


# ---- images ------------------------------------------------------------------------------------


def open_image(
    source: ImageSource,
    *,
    allow_remote: bool = False,
    allowed_local_dir: str | os.PathLike | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """An image with its header read and its size checked, pixels not decoded yet.

    Close it (or use it as a context manager) when done; `decode_rgb` turns it into RGB pixels.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _array_to_image(source)
    else:
        data = read_source(source, allow_remote=allow_remote, allowed_local_dir=allowed_local_dir)
        image = _open_lazy(io.BytesIO(data) if isinstance(data, bytes) else data)
    width, height = image.size
    problem = None
    if width < 1 or height < 1:
        problem = f"image has a zero side: {width}x{height} (width x height)"
    elif width * height > max_image_pixels:
        problem = (
            f"image of {width}x{height} (width x height) is over the limit of {max_image_pixels} "
            "pixels (decompression bomb guard); downscale it first or raise max_image_pixels"
        )
    if problem is not None:
        if image is not source:
            image.close()
        raise MediaError(problem)
    return image


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) after the EXIF orientation is applied, from the header only.

    Footgun: Pillow's PNG getexif() decodes the whole image, which must not happen before the
    shape checks; so only EXIF already read with the header counts here. An orientation found
    later (a PNG eXIf chunk after the pixels) is still applied by `decode_rgb`, and callers
    re-plan from the decoded size.
    """
    width, height = image.size
    orientation = 1
    try:
        if "exif" in image.info:
            exif = Image.Exif()
            exif.load(image.info["exif"])
            orientation = exif.get(_EXIF_ORIENTATION, 1)
        elif getattr(image, "im", None) is not None:  # already decoded (a PIL image passed in)
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - broken EXIF must not break the image; it is ignored
        orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def decode_rgb(image: Image.Image) -> Image.Image:
    """Decode the (first frame of the) image, apply EXIF orientation, convert to RGB."""
    try:
        image.load()
        rgb = image
        if rgb.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            rgb = ImageOps.exif_transpose(rgb)
        rgb = to_rgb(rgb)
        if rgb is image and getattr(image, "fp", None) is not None:
            rgb = image.copy()  # detach from a file that multi-frame formats keep open
        return rgb
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise many types on corrupt data
        raise MediaError(f"cannot decode image: {type(e).__name__}: {e}") from e


def load_image(
    source: ImageSource,
    *,
    allow_remote: bool = False,
    allowed_local_dir: str | os.PathLike | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Any supported source -> an RGB PIL image (EXIF-oriented, transparency on white).

    Sources: a path or `file://` URL, a `data:` URI, raw bytes, an `http(s)://` URL (only with
    allow_remote=True), a PIL image, or a uint8 array (HxW grayscale, HxWx1/3/4).
    Animated images give their first frame. Raises MediaError on anything unreadable or refused.
    """
    image = open_image(
        source,
        allow_remote=allow_remote,
        allowed_local_dir=allowed_local_dir,
        max_image_pixels=max_image_pixels,
    )
    rgb = None
    try:
        rgb = decode_rgb(image)
        return rgb
    finally:
        if image is not source and image is not rgb:
            image.close()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (as transformers and qwen-vl-utils do).

    Beyond the reference: 16/32-bit integer and float modes are scaled to 8 bits instead of
    being clipped (Pillow's own convert("RGB") turns most of a 16-bit image white).
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_l(image)
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F" and values.size and values.max() <= 1.0:
        values = values * 255.0  # float images in [0, 1]
    elif values.size and values.max() > 255:
        values = values / 257.0  # 16-bit range to 8-bit
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise MediaError(f"image arrays must be uint8 (HxW or HxWxC), got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(array))  # uint8: L, RGB or RGBA
    raise MediaError(
        f"image arrays must be HxW or HxWx1/3/4 (channels last), got shape {array.shape}"
    )


def _open_lazy(file: Path | io.BytesIO) -> Image.Image:
    try:
        return Image.open(file)
    except Image.DecompressionBombError as e:
        raise MediaError(f"image refused as a decompression bomb: {e}") from e
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise many types on corrupt headers
        raise MediaError(f"cannot open image: {type(e).__name__}: {e}") from e
