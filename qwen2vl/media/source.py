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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from qwen2vl.errors import MediaError, shown

logger = logging.getLogger(__name__)

# 128 Mpx (about 384 MB as RGB). Pillow itself refuses twice its own 89 Mpx warning bound.
MAX_IMAGE_PIXELS = 128 * 1024 * 1024
# 4096 x 4096: above 8K-wide video; every sampled frame is decoded at this size before resizing.
MAX_FRAME_PIXELS = 4096 * 4096
MAX_REMOTE_IMAGE_BYTES = 64 * 1024 * 1024
MAX_REMOTE_VIDEO_BYTES = 1024 * 1024 * 1024
REMOTE_TIMEOUT_S = 30.0

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class MediaAccess:
    """Where media may come from and how large a source may be: the one policy `read_source`
    applies to every way a source can be written (path, file:// URL, data: URI, http(s) URL,
    bytes), and `open_image` / the video planner apply to sizes read from headers.

    The library's default reads local files anywhere and no URLs; a server refuses local paths
    unless it names a directory (`allow_local=False`, or `local_dir`). `how_to_allow_*` finish
    the refusal messages with the switch of the interface in use.
    """

    allow_local: bool = True
    local_dir: str | os.PathLike | None = None  # local reads confined here, symlinks resolved
    allow_remote: bool = False
    max_image_pixels: int = MAX_IMAGE_PIXELS  # an image's width x height, from its header
    max_frame_pixels: int = MAX_FRAME_PIXELS  # a video frame's width x height, from its header
    how_to_allow_local: str = "pass MediaAccess(allow_local=True)"
    how_to_allow_remote: str = "pass MediaAccess(allow_remote=True)"

    def __post_init__(self) -> None:
        if self.max_image_pixels < 1 or self.max_frame_pixels < 1:
            raise MediaError(
                f"pixel limits must be positive: max_image_pixels={self.max_image_pixels}, "
                f"max_frame_pixels={self.max_frame_pixels}"
            )


DEFAULT_ACCESS = MediaAccess()


def read_source(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    access: MediaAccess = DEFAULT_ACCESS,
    *,
    max_remote_bytes: int = MAX_REMOTE_IMAGE_BYTES,
) -> Path | bytes:
    """A checked local path, or the bytes behind a data: URI, an http(s) URL or raw bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, os.PathLike):
        return local_path(os.fspath(source), access)
    if not isinstance(source, str):
        raise MediaError(f"unsupported media source of type {type(source).__name__}")
    if source.startswith("data:"):
        return decode_data_uri(source)
    if source.startswith(("http://", "https://")):
        if not access.allow_remote:
            raise MediaError(
                f"remote media refused: {shown(source)}; {access.how_to_allow_remote} to fetch "
                "http(s) URLs",
                code="remote_media_refused",
            )
        return fetch_remote(source, max_bytes=max_remote_bytes)
    if source.startswith("file://"):
        return local_path(_file_url_path(source), access)
    if _SCHEME.match(source):
        raise MediaError(
            f"unsupported URL scheme in {shown(source)}; use a path, file://, data: or http(s)"
        )
    return local_path(source, access)


def local_path(path: str, access: MediaAccess = DEFAULT_ACCESS) -> Path:
    """The resolved path of an existing file, allowed by `access`.

    A refused path is refused before the file system is asked about it, so the error tells an
    unauthorised caller nothing about what exists.
    """
    if not access.allow_local:
        raise MediaError(
            f"local media paths are refused ({shown(path)}); {access.how_to_allow_local}",
            code="local_media_refused",
        )
    try:  # no file is opened here; symlinks and .. are resolved before the confinement check
        resolved = Path(path).expanduser().resolve()
        root = None if access.local_dir is None else Path(access.local_dir).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:  # loops, NUL bytes, unencodable names
        raise MediaError(f"cannot read media file {shown(path)}: {type(e).__name__}") from e
    if root is not None and not resolved.is_relative_to(root):
        raise MediaError(
            f"media file {shown(path)} is outside the allowed media directory",
            code="local_media_refused",
        )
    if not resolved.is_file():
        raise MediaError(f"media file {shown(path)} does not exist or is not a regular file")
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
                raise MediaError(f"{shown(url)} is {declared} bytes, over the cap of {max_bytes}")
            while chunk := response.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise MediaError(f"{shown(url)} is over the cap of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise MediaError(f"{shown(url)} took over {timeout_s:.0f} s to download")
                chunks.append(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise MediaError(f"cannot fetch {shown(url)}: {e}") from e
    return b"".join(chunks)


def _file_url_path(url: str) -> str:
    # qwen-vl-utils strips the scheme and keeps the rest verbatim; proper URLs percent-encode.
    raw = url[len("file://") :]
    return raw if os.path.exists(raw) else urllib.parse.unquote(raw)


# ---- images ------------------------------------------------------------------------------------


def open_image(
    source: ImageSource, access: MediaAccess = DEFAULT_ACCESS, *, max_pixels: int | None = None
) -> Image.Image:
    """An image with its header read and its size checked, pixels not decoded yet.

    max_pixels: the size limit (default access.max_image_pixels; video frames pass
    access.max_frame_pixels). Close the image (or use it as a context manager) when done;
    `decode_rgb` turns it into RGB pixels.
    """
    limit = access.max_image_pixels if max_pixels is None else max_pixels
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _array_to_image(source)
    else:
        data = read_source(source, access)
        image = _open_lazy(io.BytesIO(data) if isinstance(data, bytes) else data)
    width, height = image.size
    problem = None
    if width < 1 or height < 1:
        problem = f"image has a zero side: {width}x{height} (width x height)"
    elif width * height > limit:
        problem = (
            f"image of {width}x{height} (width x height) is over the limit of {limit} pixels "
            "(decompression bomb guard); downscale it first or raise the pixel limit"
        )
    if problem is not None:
        if image is not source:
            image.close()
        raise MediaError(problem, code="image_too_large" if width and height else None)
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
        _refuse_short_png(image)
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


# Samples per pixel of each PNG colour type; Adam7 passes as (x0, y0, x step, y step).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
_PNG_READ_BYTES = 1 << 20


def _refuse_short_png(image: Image.Image) -> None:
    """MediaError when a not yet decoded PNG's pixel data is shorter than its header says.

    Footgun: Pillow stops quietly when the zlib stream ends before the last row (a file cut
    and closed again, or written short) and leaves the missing rows black; it notices only a
    stream cut mid-way. So the stream is inflated once here, counting bytes and keeping none.
    """
    fp = getattr(image, "fp", None)
    if image.format != "PNG" or not image.tile or fp is None:
        return
    position = fp.tell()
    try:
        fp.seek(8)
        ihdr = fp.read(21)[8:]  # after the IHDR length and type
        expected = _png_data_bytes(ihdr)
        fp.seek(8)
        found = _inflated_bytes(_idat_pieces(fp), expected)
    finally:
        fp.seek(position)
    if found < expected:
        raise MediaError(
            f"cannot decode image: truncated PNG: its pixel data holds {found} of the {expected} "
            "bytes its header promises"
        )


def _png_data_bytes(ihdr: bytes) -> int:
    """Size of the filtered scanlines an IHDR promises (a filter byte starts each row)."""
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    bits = ihdr[8] * _PNG_SAMPLES[ihdr[9]]
    passes = _ADAM7 if ihdr[12] == 1 else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            total += rows * (1 + (columns * bits + 7) // 8)
    return total


def _idat_pieces(fp: BinaryIO) -> Iterator[bytes]:
    """The bytes of the consecutive IDAT chunks after the signature, in pieces of at most 1 MiB."""
    in_idat = False
    while len(head := fp.read(8)) == 8:
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind != b"IDAT":
            if in_idat:
                return
            fp.seek(length + 4, os.SEEK_CUR)
            continue
        in_idat = True
        while length > 0 and (piece := fp.read(min(length, _PNG_READ_BYTES))):
            length -= len(piece)
            yield piece
        fp.seek(4, os.SEEK_CUR)  # the chunk's CRC


def _inflated_bytes(pieces: Iterator[bytes], limit: int) -> int:
    """How many bytes a zlib stream inflates to, counted up to limit, output bounded to 1 MiB."""
    inflater = zlib.decompressobj()
    total = 0
    try:
        for data in pieces:
            while data and total < limit:
                total += len(inflater.decompress(data, _PNG_READ_BYTES))
                data = inflater.unconsumed_tail
            if total >= limit or inflater.eof:
                return total
        return total + len(inflater.flush())
    except zlib.error as e:
        raise MediaError(f"cannot decode image: corrupt PNG pixel data: {e}") from e


def load_image(
    source: ImageSource, access: MediaAccess = DEFAULT_ACCESS, *, max_pixels: int | None = None
) -> Image.Image:
    """Any supported source -> an RGB PIL image (EXIF-oriented, transparency on white).

    Sources: a path or `file://` URL, a `data:` URI, raw bytes, an `http(s)://` URL (only when
    `access` allows remote media), a PIL image, or a uint8 array (HxW grayscale, HxWx1/3/4).
    Animated images give their first frame. Raises MediaError on anything unreadable or refused.
    """
    image = open_image(source, access, max_pixels=max_pixels)
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
    Both conversions run in stripes: a tiny file can hold a huge image, and whole-image
    temporaries (float64, RGBA copies) would cost several times the RGB result.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        high = max(np.asarray(image.crop(box)).max() for box in _stripe_boxes(image.size))
        return _in_stripes(image, lambda stripe: _high_depth_to_l(stripe, high))
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        return _in_stripes(image, _on_white)
    return image.convert("RGB")


def _high_depth_to_l(stripe: Image.Image, high: float) -> Image.Image:
    """A stripe of a 16/32-bit integer or float image as 8-bit L; high: the image's maximum."""
    values = np.asarray(stripe, dtype=np.float64)
    if stripe.mode == "F" and high <= 1.0:
        values = values * 255.0  # float images in [0, 1]
    elif high > 255:
        values = values / 257.0  # 16-bit range to 8-bit
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


# Stripes of about this many pixels keep a conversion's temporaries to a few MB.
_STRIPE_PIXELS = 1 << 19


def _stripe_boxes(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    width, height = size
    rows = max(1, _STRIPE_PIXELS // width)
    return [(0, top, width, min(height, top + rows)) for top in range(0, height, rows)]


def _in_stripes(image: Image.Image, convert) -> Image.Image:
    """RGB image built stripe by stripe: besides the result, one stripe's temporaries live."""
    rgb = Image.new("RGB", image.size)
    for box in _stripe_boxes(image.size):
        rgb.paste(convert(image.crop(box)), box[:2])
    return rgb


def _on_white(stripe: Image.Image) -> Image.Image:
    rgba = stripe.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


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
