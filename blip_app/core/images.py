"""Decoding untrusted uploads into clean RGB images.

Everything a user uploads goes through :func:`load_image`, which returns a fully loaded, upright,
8-bit RGB :class:`PIL.Image.Image` whose long side is at most ``ImageLimits.max_side``, or raises
:class:`~blip_app.errors.BadImageError` with a sentence that names the problem.

Rules, in the order they are applied:

1. Size of the file: ``max_bytes`` is checked before anything is parsed (bytes, paths, streams).
2. Format from the content, never from the name: the bytes are parsed only by the Pillow plugins in
   :data:`ALLOWED_FORMATS` (``Image.open(fp, formats=ALLOWED_FORMATS)``). A file that none of them
   accepts is identified by its magic bytes only to word the refusal (PDF, TIFF, PSD, HEIC, ZIP, SVG, ...);
   it is never handed to another Pillow plugin.
3. Size of the picture, from the header, before any pixel is decoded: at most ``max_pixels`` pixels
   and a long side at most ``max_aspect_ratio`` times the short side ("too thin to describe").
4. Decoding: only the first frame of an animation; a JPEG that will be shrunk a lot is decoded at
   1/2, 1/4 or 1/8 scale with ``draft()``. A truncated file is refused (Pillow's
   ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone, and must stay False).
5. Normalisation: EXIF orientation applied; downscaled with Lanczos to ``max_side``; 16-bit and
   32-bit integer/float greyscale stretched to 8 bits by the range the image really uses;
   transparency (alpha channel, ``tRNS``, transparent palette entry) composited onto white;
   CMYK, palette, 1-bit and other modes converted to RGB. Metadata (EXIF, ICC, text) is dropped.

The result is a new in-memory image: it holds no file handle and no reference to the source.

Gradio: ``gr.Image`` opens every upload with a plain ``PIL.Image.open`` (all of Pillow's plugins)
before the app's function runs, so call :func:`install_pillow_limits` once at start-up: Pillow's
process-wide decompression-bomb check then refuses, inside Gradio too, any image over
``max_pixels`` before its pixels are decoded. With its defaults (``image_mode="RGB"``) Gradio also
decodes and converts the upload with whatever plugin recognised it (a TIFF named ``.png`` arrives as
an anonymous RGB image), so prefer ``gr.Image(type="filepath", image_mode=None)`` (Gradio then only
reads the header and passes the path on) or ``gr.File``, and hand the path to :func:`load_image`.
A file that Pillow cannot open at all fails inside Gradio, before any of this module's messages.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import PIL.Image
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from blip_app.errors import BadImageError

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "ImageLimits",
    "image_digest",
    "install_pillow_limits",
    "load_image",
]

logger = logging.getLogger(__name__)

#: Pillow format names whose plugins may parse an upload, most common first; passed as-is to
#: ``Image.open(fp, formats=ALLOWED_FORMATS)``.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

#: Formats an opened image may report. "MPO" is the multi-picture JPEG that many phones and cameras
#: write (the primary picture plus a preview or a second view). It has no parser of its own that
#: ``Image.open`` could be given (``Image.OPEN`` has no "MPO" entry): the JPEG plugin's factory turns
#: a JPEG with a multi-picture index into an ``MpoImageFile`` whose frames the same JPEG decoder
#: reads. It is accepted, and its first (primary) frame is used.
_ALLOWED_RESULT_FORMATS = frozenset(ALLOWED_FORMATS) | {"MPO"}

#: How the allowed formats are named to users (MPO files are JPEGs to them).
ALLOWED_FORMATS_TEXT = "JPEG, PNG, WebP, GIF, BMP"

#: At most this many pixels (width x height, from the header). 40 MP covers every phone camera
#: (a 200 MP sensor writes 12.5-50 MP files by default) and keeps one decoded RGBA image under 160 MB.
DEFAULT_MAX_PIXELS = 40_000_000

#: The long side of what is kept. The models see 224 x 224 pixels; 2048 leaves room for display
#: and for cropping without keeping tens of megabytes per request.
DEFAULT_MAX_SIDE = 2048

#: Largest accepted ratio of the long side to the short side. Panoramas (up to about 12:1) and web
#: banners (about 8:1) pass; a 60000 x 2 strip would reach the model as a 224 x 224 smear.
DEFAULT_MAX_ASPECT_RATIO = 50.0

#: Largest accepted file: 20 MiB (the largest phone JPEGs are around 15 MB).
DEFAULT_MAX_BYTES = 20 * 1024 * 1024

_WHITE = (255, 255, 255)

#: Modes with more than 8 bits per sample: stretched by their actual range.
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")

_EXPECTED_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    TypeError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
)


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to every uploaded image.

    Attributes:
        max_pixels: refuse pictures with more pixels than this (width x height, read from the header).
        max_side: downscale so that the long side is at most this many pixels.
        max_bytes: refuse files larger than this many bytes, before parsing them.
        max_aspect_ratio: refuse pictures whose long side is more than this many times the short side.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE
    max_bytes: int = DEFAULT_MAX_BYTES
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_side < 1 or self.max_bytes < 1:
            raise ValueError(f"Image limits must be positive: {self!r}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be at least 1: {self!r}")


def install_pillow_limits(limits: ImageLimits = ImageLimits()) -> None:
    """Set Pillow's process-wide decompression-bomb limit so that Gradio's own decoding obeys it too.

    Pillow's ``Image.open`` raises ``DecompressionBombError`` for images over
    ``2 * Image.MAX_IMAGE_PIXELS`` pixels (before decoding any pixel) and only warns above
    ``Image.MAX_IMAGE_PIXELS``. Setting the latter to half of ``limits.max_pixels`` puts the hard
    error at ``limits.max_pixels``, so ``gr.Image``'s own ``PIL.Image.open`` of an upload refuses
    exactly what :func:`load_image` refuses. The warning tier below it, which no longer means
    anything, is silenced (a process-wide ``warnings`` filter for ``DecompressionBombWarning``).

    Call once at start-up, before the Gradio app handles requests. ``ImageFile.LOAD_TRUNCATED_IMAGES``
    is not changed; a warning is logged if some other code has turned it on.
    """
    Image.MAX_IMAGE_PIXELS = -(-limits.max_pixels // 2)  # ceil: never stricter than load_image
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code): Gradio will accept "
            "truncated images; load_image still refuses them."
        )
    logger.info(
        "Pillow decompression-bomb limit set: images over %d pixels are refused when opened.",
        2 * Image.MAX_IMAGE_PIXELS,
    )


def load_image(
    source: str | os.PathLike[str] | bytes | BinaryIO | PIL.Image.Image,
    limits: ImageLimits = ImageLimits(),
) -> PIL.Image.Image:
    """Decode an untrusted image into an upright RGB image whose long side is at most limits.max_side.

    Args:
        source: a path to the file, its content as bytes, a binary stream (read from its current
            position; not closed), or a ``PIL.Image.Image`` such as the one ``gr.Image(type="pil")``
            hands over (the same size check and normalisation apply; it is loaded, and moved back to
            its first frame if it is an animation, but not closed: the caller owns it).
        limits: the limits to apply.

    Returns:
        A new, fully loaded ``PIL.Image.Image`` in mode ``"RGB"`` with empty ``info``, independent of
        the source (the file may be deleted, the stream closed).

    Raises:
        BadImageError: the file is empty, too large, not an allowed format, truncated or corrupt,
            or the picture has too many pixels or is too thin. The message is written for the user.
        TypeError: ``source`` is none of the accepted types (a programming error).
    """
    if isinstance(source, PIL.Image.Image):
        return _load_pil_image(source, limits)
    data = _read_source(source, limits)
    return _decode_bytes(data, limits)


def image_digest(image: PIL.Image.Image) -> str:
    """A hex SHA-256 of the decoded pixels, mode and size: the same picture gives the same key whatever file it came from.

    Meant for images returned by :func:`load_image` (RGB, no metadata), where it is a cache key for
    the picture: saving it as PNG or BMP and loading it again gives the same digest. For palette
    images the palette is included, so that two images with equal indices but different colours differ.
    """
    digest = hashlib.sha256()
    digest.update(f"{image.mode}\0{image.width}x{image.height}\0".encode())
    if image.mode in ("P", "PA"):
        digest.update(bytes(image.getpalette() or ()))
    digest.update(image.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Reading the source


def _read_source(source: str | os.PathLike[str] | bytes | BinaryIO, limits: ImageLimits) -> bytes:
    """The bytes of ``source``, refusing empty files and files over ``limits.max_bytes`` before parsing."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > limits.max_bytes:
            raise _refuse(_too_many_bytes(len(data), limits))
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            size = os.stat(path).st_size
            if size > limits.max_bytes:
                raise _refuse(_too_many_bytes(size, limits))
            with open(path, "rb") as handle:
                data = handle.read(limits.max_bytes + 1)
        except FileNotFoundError:
            raise BadImageError(f"The image file {os.path.basename(path)!r} does not exist.") from None
        except OSError as exc:
            logger.warning("Could not read the image file %r: %r", path, exc)
            raise BadImageError(
                f"The image file {os.path.basename(path)!r} could not be read ({exc.strerror or 'I/O error'})."
            ) from None
        if len(data) > limits.max_bytes:  # the file grew after stat()
            raise _refuse(f"The file is larger than {_mb(limits.max_bytes)}, the limit.")
    elif hasattr(source, "read"):
        data = source.read(limits.max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"load_image needs a binary stream, got one that returns {type(data).__name__}")
        data = bytes(data)
        if len(data) > limits.max_bytes:
            raise _refuse(f"The file is larger than {_mb(limits.max_bytes)}, the limit.")
    else:
        raise TypeError(f"load_image cannot read a {type(source).__name__}")
    if not data:
        raise _refuse("The file is empty.")
    return data


# --------------------------------------------------------------------------------------------------
# Decoding


def _decode_bytes(data: bytes, limits: ImageLimits) -> PIL.Image.Image:
    """Parse ``data`` with the allowed plugins only, check its size from the header, then decode it."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise _refuse(_unidentified_message(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _refuse(_bomb_message(exc, limits), exc) from None
    except MemoryError:
        raise _refuse(_out_of_memory_message()) from None
    except Exception as exc:  # any failure to parse hostile bytes is the file's fault
        raise _refuse(_corrupt_message(_sniff_allowed(data)), exc) from None
    with image:
        return _finish(image, limits, from_file=True)


def _load_pil_image(image: PIL.Image.Image, limits: ImageLimits) -> PIL.Image.Image:
    """Apply the format and size checks and the normalisation to an image that is already open."""
    return _finish(image, limits, from_file=False)


def _finish(image: PIL.Image.Image, limits: ImageLimits, *, from_file: bool) -> PIL.Image.Image:
    """Check the header, decode the first frame and normalise it into a new RGB image."""
    fmt = image.format
    if fmt is not None and fmt.upper() not in _ALLOWED_RESULT_FORMATS:
        # Only reachable with a PIL image opened elsewhere: gr.Image(type="pil") hands over the lazy,
        # undecoded file Pillow opened with any plugin when the upload is named *.gif or image_mode is
        # None. Refuse before that plugin decodes any pixel.
        raise _refuse(_not_allowed_message(_PILLOW_FORMAT_NAMES.get(fmt.upper(), f"a {fmt} file")))
    _check_dimensions(image.size, limits)
    try:
        if image.tell() != 0:
            image.seek(0)
        if from_file and image.format in ("JPEG", "MPO"):
            _draft_jpeg(image, limits.max_side)
        image.load()
        upright = _apply_orientation(image)
        result = _normalise(upright, limits.max_side)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _refuse(_bomb_message(exc, limits), exc) from None
    except MemoryError:
        raise _refuse(_out_of_memory_message()) from None
    except Exception as exc:
        raise _refuse(_corrupt_message(_FORMAT_LABELS.get(fmt or "")), exc) from None
    if result is image or isinstance(result, ImageFile.ImageFile):
        result = result.copy()
    result.info = {}
    return result


def _check_dimensions(size: tuple[int, int], limits: ImageLimits) -> None:
    """Refuse from the header: no pixels, too many pixels, or too thin."""
    width, height = size
    if width < 1 or height < 1:
        raise _refuse(f"The image is {width} x {height} pixels: it has no pixels.")
    pixels = width * height
    if pixels > limits.max_pixels:
        raise _refuse(
            f"The image is {width} x {height} pixels ({pixels / 1e6:.1f} megapixels); "
            f"the limit is {limits.max_pixels / 1e6:g} megapixels."
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise _refuse(
            f"The image is {width} x {height} pixels, too thin to describe: its long side is "
            f"{ratio:.0f} times its short side, and the limit is {limits.max_aspect_ratio:g} to 1."
        )


def _target_size(size: tuple[int, int], max_side: int) -> tuple[int, int] | None:
    """The size that fits ``max_side`` with the same aspect ratio, or None if ``size`` already fits."""
    width, height = size
    long_side = max(width, height)
    if long_side <= max_side:
        return None
    scale = max_side / long_side
    return (
        min(max_side, max(1, round(width * scale))),
        min(max_side, max(1, round(height * scale))),
    )


def _draft_jpeg(image: PIL.Image.Image, max_side: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the picture will be shrunk that much anyway."""
    target = _target_size(image.size, max_side)
    if target is not None:
        before = image.size
        image.draft(None, target)  # keeps each side >= target, so the final resize still shrinks
        if image.size != before:
            logger.debug("JPEG decoded at reduced scale: %s -> %s", before, image.size)


def _apply_orientation(image: PIL.Image.Image) -> PIL.Image.Image:
    """Rotate/flip according to the EXIF orientation tag; a broken EXIF block is ignored."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as exc:  # malformed EXIF must not make the picture unreadable
        logger.info("Ignoring unreadable EXIF data: %r", exc)
        return image
    if orientation not in range(2, 9):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:
        logger.info("Ignoring EXIF orientation %r that could not be applied: %r", orientation, exc)
        return image


def _normalise(image: PIL.Image.Image, max_side: int) -> PIL.Image.Image:
    """Downscale to ``max_side`` and convert to 8-bit RGB (transparency onto white)."""
    mode = image.mode
    try:
        if mode in _HIGH_DEPTH_MODES:
            work = image if mode == "F" else image.convert("F")
            return _stretch_to_rgb(_fit(work, max_side), mode)
        if mode == "La":
            image = image.convert("LA")
        if image.has_transparency_data:  # alpha channel, tRNS colour, or transparent palette entries
            rgba = image if image.mode == "RGBA" else image.convert("RGBA")
            return _onto_white(_fit(rgba, max_side))
        if image.mode == "1":
            image = image.convert("L")
        elif image.mode not in ("L", "RGB"):  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...
            image = image.convert("RGB")
    except ValueError as exc:  # "conversion from X to Y not supported"
        if "conversion" not in str(exc):
            raise
        raise _refuse(f"The image uses a colour mode ({mode}) that cannot be converted to RGB.", exc) from None
    fitted = _fit(image, max_side)
    return fitted if fitted.mode == "RGB" else fitted.convert("RGB")


def _fit(image: PIL.Image.Image, max_side: int) -> PIL.Image.Image:
    """Downscale with Lanczos (after a fast box reduction for large factors) to fit ``max_side``."""
    target = _target_size(image.size, max_side)
    if target is None:
        return image
    return image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _onto_white(rgba: PIL.Image.Image) -> PIL.Image.Image:
    """Composite an RGBA image onto an opaque white background."""
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _stretch_to_rgb(image: PIL.Image.Image, source_mode: str) -> PIL.Image.Image:
    """Map a mode-F image to 8 bits by the range of its finite values (not by clipping at 255).

    A constant image keeps its level where it can: 16-bit values are divided by 257 and other values
    are clipped to 0..255. Non-finite values (NaN, +-inf in float images) become black or white.
    """
    values = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(values)
    sample = values if finite.all() else values[finite]
    if sample.size == 0:
        out = np.zeros(values.shape, dtype=np.float32)
    else:
        low, high = float(sample.min()), float(sample.max())
        if high > low:
            out = (values - low) * np.float32(255.0 / (high - low))
        else:
            level = low / 257.0 if source_mode.startswith("I;16") else low
            out = np.full(values.shape, level, dtype=np.float32)
    out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    grey = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


# --------------------------------------------------------------------------------------------------
# Messages


def _refuse(message: str, cause: BaseException | None = None) -> BadImageError:
    """Log a refusal (with Pillow's own exception, which the user never sees) and build the error."""
    if cause is None:
        logger.info("Image refused: %s", message)
    elif isinstance(cause, (*_EXPECTED_DECODE_ERRORS, Image.DecompressionBombError, Image.DecompressionBombWarning)):
        logger.info("Image refused: %s (%s: %s)", message, type(cause).__name__, cause)
    else:  # an exception type Pillow is not known to raise for bad files: keep the traceback
        logger.warning("Image refused after an unexpected %s", type(cause).__name__, exc_info=cause)
    return BadImageError(message)


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / (1024 * 1024):.1f}".removesuffix(".0") + " MB"


def _too_many_bytes(size: int, limits: ImageLimits) -> str:
    return f"The file is {_mb(size)}; the limit is {_mb(limits.max_bytes)}."


def _bomb_message(exc: BaseException, limits: ImageLimits) -> str:
    """Word Pillow's decompression-bomb refusal (it gives the pixel count, not the dimensions)."""
    limit = limits.max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if isinstance(exc, Image.DecompressionBombError):
            pillow_limit *= 2
        limit = min(limit, pillow_limit)
    match = _BOMB_PIXELS.search(str(exc))
    if match is None:
        return f"The image has too many pixels; the limit is {limit / 1e6:g} megapixels."
    pixels = int(match.group(1))
    return f"The image has {pixels} pixels ({pixels / 1e6:.1f} megapixels); the limit is {limit / 1e6:g} megapixels."


def _out_of_memory_message() -> str:
    return "The image could not be decoded: it needs more memory than this server has free. Please try a smaller image."


def _corrupt_message(label: str | None) -> str:
    what = f"This {label} file" if label else "The image file"
    return f"{what} is truncated or corrupt and cannot be decoded; please re-save or re-export it and try again."


def _not_allowed_message(description: str) -> str:
    return f"This file is {description}, which is not an allowed image format. Allowed formats: {ALLOWED_FORMATS_TEXT}."


def _not_image_message(description: str) -> str:
    return f"This file is {description}, not an image. Allowed formats: {ALLOWED_FORMATS_TEXT}."


_HEIC_MESSAGE = "HEIC images are not supported yet; please convert to JPEG or PNG."
_AVIF_MESSAGE = "AVIF images are not supported yet; please convert to JPEG or PNG."

#: How the allowed formats are named in "truncated or corrupt" messages.
_FORMAT_LABELS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}

#: Descriptions of Pillow formats that are not allowed, for PIL images opened elsewhere.
_PILLOW_FORMAT_NAMES = {
    "TIFF": "a TIFF image",
    "PSD": "a Photoshop (PSD) image",
    "EPS": "a PostScript (EPS) document",
    "PDF": "a PDF document",
    "ICO": "a Windows icon (ICO)",
    "CUR": "a Windows cursor (CUR)",
    "ICNS": "an Apple icon (ICNS)",
    "JPEG2000": "a JPEG 2000 image",
    "AVIF": "an AVIF image",
    "DDS": "a DirectDraw texture (DDS)",
    "PPM": "a Netpbm (PPM/PGM/PBM) image",
    "TGA": "a Targa (TGA) image",
    "PCX": "a PCX image",
    "SGI": "an SGI image",
    "QOI": "a QOI image",
    "FITS": "a FITS image",
    "XBM": "an X bitmap (XBM)",
    "XPM": "an X pixmap (XPM)",
    "WMF": "a Windows metafile (WMF/EMF)",
    "DIB": "a device-independent bitmap (DIB)",
}


# --------------------------------------------------------------------------------------------------
# Recognising what a refused file is (for the message only; nothing here parses the file)

_IMAGE, _OTHER, _HEIC, _AVIF, _BROKEN = "image", "other", "heic", "avif", "broken"

#: (offset, magic, kind, description). Checked in order; the first match wins.
_SIGNATURES: tuple[tuple[int, bytes, str, str], ...] = (
    # Allowed formats: reaching the sniffer means the allowed plugin could not parse the header.
    (0, b"\xff\xd8\xff", _BROKEN, "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", _BROKEN, "PNG"),
    (0, b"GIF87a", _BROKEN, "GIF"),
    (0, b"GIF89a", _BROKEN, "GIF"),
    # Other images.
    (0, b"II*\x00", _IMAGE, "a TIFF image (or a camera RAW file)"),
    (0, b"MM\x00*", _IMAGE, "a TIFF image (or a camera RAW file)"),
    (0, b"II+\x00", _IMAGE, "a BigTIFF image"),
    (0, b"MM\x00+", _IMAGE, "a BigTIFF image"),
    (0, b"IIRO", _IMAGE, "an Olympus camera RAW (ORF) file"),
    (0, b"IIU\x00", _IMAGE, "a Panasonic camera RAW (RW2) file"),
    (0, b"FUJIFILMCCD-RAW", _IMAGE, "a Fujifilm camera RAW (RAF) file"),
    (0, b"8BPS", _IMAGE, "a Photoshop (PSD) image"),
    (0, b"gimp xcf", _IMAGE, "a GIMP (XCF) image"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", _IMAGE, "a JPEG 2000 image"),
    (0, b"\xff\x4f\xff\x51", _IMAGE, "a JPEG 2000 image"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", _IMAGE, "a JPEG XL image"),
    (0, b"\xff\x0a", _IMAGE, "a JPEG XL image"),
    (0, b"\x00\x00\x01\x00", _IMAGE, "a Windows icon (ICO)"),
    (0, b"\x00\x00\x02\x00", _IMAGE, "a Windows cursor (CUR)"),
    (0, b"icns", _IMAGE, "an Apple icon (ICNS)"),
    (0, b"DDS ", _IMAGE, "a DirectDraw texture (DDS)"),
    (0, b"qoif", _IMAGE, "a QOI image"),
    (0, b"v/1\x01", _IMAGE, "an OpenEXR image"),
    (0, b"#?RADIANCE", _IMAGE, "a Radiance HDR image"),
    (0, b"#?RGBE", _IMAGE, "a Radiance HDR image"),
    (0, b"SIMPLE  =", _IMAGE, "a FITS image"),
    (128, b"DICM", _IMAGE, "a DICOM medical image"),
    (0, b"\xd7\xcd\xc6\x9a", _IMAGE, "a Windows metafile (WMF)"),
    (0, b"%!PS-Adobe-3.0 EPSF", _IMAGE, "a PostScript (EPS) document"),
    (0, b"\xc5\xd0\xd3\xc6", _IMAGE, "a PostScript (EPS) document"),
    # Documents, archives, media, programs.
    (0, b"%PDF", _OTHER, "a PDF document"),
    (0, b"%!PS", _OTHER, "a PostScript document"),
    (0, b"PK\x03\x04", _OTHER, "a ZIP archive (or an Office/OpenDocument file)"),
    (0, b"PK\x05\x06", _OTHER, "a ZIP archive"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", _OTHER, "a Microsoft Office document"),
    (0, b"{\\rtf", _OTHER, "an RTF document"),
    (0, b"\x1f\x8b", _OTHER, "a gzip-compressed file"),
    (0, b"BZh", _OTHER, "a bzip2-compressed file"),
    (0, b"\xfd7zXZ\x00", _OTHER, "an xz-compressed file"),
    (0, b"(\xb5/\xfd", _OTHER, "a Zstandard-compressed file"),
    (0, b"Rar!\x1a\x07", _OTHER, "a RAR archive"),
    (0, b"7z\xbc\xaf\x27\x1c", _OTHER, "a 7-Zip archive"),
    (257, b"ustar", _OTHER, "a tar archive"),
    (0, b"\x1aE\xdf\xa3", _OTHER, "a Matroska/WebM video"),
    (0, b"OggS", _OTHER, "an Ogg audio or video file"),
    (0, b"fLaC", _OTHER, "a FLAC audio file"),
    (0, b"ID3", _OTHER, "an MP3 audio file"),
    (0, b"FLV\x01", _OTHER, "a Flash video"),
    (0, b"\x00\x00\x01\xba", _OTHER, "an MPEG video"),
    (0, b"\x00\x00\x01\xb3", _OTHER, "an MPEG video"),
    (0, b"\x7fELF", _OTHER, "a Linux program (ELF)"),
    (0, b"MZ", _OTHER, "a Windows program (EXE/DLL)"),
    (0, b"\xca\xfe\xba\xbe", _OTHER, "a Java class or macOS program"),
    (0, b"\xcf\xfa\xed\xfe", _OTHER, "a macOS program"),
    (0, b"\x00asm", _OTHER, "a WebAssembly module"),
    (0, b"SQLite format 3\x00", _OTHER, "an SQLite database"),
    (0, b"wOFF", _OTHER, "a web font (WOFF)"),
    (0, b"wOF2", _OTHER, "a web font (WOFF2)"),
    (0, b"\x00\x01\x00\x00\x00", _OTHER, "a TrueType font"),
    (0, b"OTTO", _OTHER, "an OpenType font"),
    (0, b"\x93NUMPY", _OTHER, "a NumPy array file"),
    (0, b"\x89HDF\r\n\x1a\n", _OTHER, "an HDF5 data file"),
)

_BMP_HEADER_SIZES = frozenset(n.to_bytes(4, "little") for n in (12, 16, 40, 52, 56, 64, 108, 124))
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"heif"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_VIDEO_BRANDS = frozenset(
    {
        b"isom",
        b"iso2",
        b"iso4",
        b"iso5",
        b"iso6",
        b"mp41",
        b"mp42",
        b"avc1",
        b"qt  ",
        b"M4V ",
        b"M4VP",
        b"3gp4",
        b"3gp5",
        b"3gp6",
        b"3g2a",
        b"MSNV",
        b"dash",
        b"f4v ",
    }
)


def _sniff(data: bytes) -> tuple[str, str] | None:
    """What a file that the allowed plugins refused probably is, from its first bytes: (kind, description)."""
    ftyp = _sniff_iso_media(data)
    if ftyp is not None:
        return ftyp
    if data[:4] == b"RIFF" and len(data) >= 12:
        riff_type = data[8:12]
        if riff_type == b"WEBP":
            return _BROKEN, "WebP"
        if riff_type == b"AVI ":
            return _OTHER, "an AVI video"
        if riff_type == b"WAVE":
            return _OTHER, "a WAV audio file"
        return _OTHER, "a RIFF media file"
    if data[:2] == b"BM" and data[14:18] in _BMP_HEADER_SIZES:
        return _BROKEN, "BMP"
    if re.match(rb"P[1-7]\s", data[:3]):
        return _IMAGE, "a Netpbm (PPM/PGM/PBM) image"
    for offset, magic, kind, description in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return kind, description
    return _sniff_text(data)


def _sniff_iso_media(data: bytes) -> tuple[str, str] | None:
    """HEIC/HEIF, AVIF, camera RAW and video files: ISO base media with an ``ftyp`` box first."""
    if data[4:8] != b"ftyp" or len(data) < 12:
        return None
    box_size = int.from_bytes(data[0:4], "big")
    end = min(max(box_size, 16), 256, len(data))
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return _AVIF, "an AVIF image"
    if brands & _HEIF_BRANDS or data[8:12] in (b"mif1", b"msf1"):
        return _HEIC, "a HEIC image"
    if b"crx " in brands:
        return _IMAGE, "a Canon camera RAW (CR3) file"
    if brands & {b"M4A ", b"M4B ", b"M4P "}:
        return _OTHER, "an MP4 audio file"
    if brands & _VIDEO_BRANDS:
        return _OTHER, "a video (MP4/MOV)"
    return _OTHER, "an ISO media file (MP4 family)"


def _sniff_text(data: bytes) -> tuple[str, str] | None:
    """SVG, HTML, XML and other text files."""
    head = data[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = head[2:].decode("utf-16-le" if head[0] == 0xFF else "utf-16-be", errors="replace")
    else:
        if b"\x00" in head:
            return None
        text = head.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="replace")
    stripped = text.lstrip().lower()
    if stripped.startswith("<svg") or (stripped.startswith(("<?xml", "<!doctype svg", "<!--")) and "<svg" in stripped):
        return _IMAGE, "an SVG (vector) image"
    if stripped.startswith(("<!doctype html", "<html", "<head", "<body")):
        return _OTHER, "an HTML page"
    if stripped.startswith("<?xml"):
        return _OTHER, "an XML document"
    if not stripped:
        return _OTHER, "a blank text file"
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    if printable >= 0.95 * len(text):
        return _OTHER, "a text file"
    return None


def _sniff_allowed(data: bytes) -> str | None:
    """The label of the allowed format that ``data`` starts like, if any (for "corrupt" messages)."""
    found = _sniff(data)
    return found[1] if found is not None and found[0] == _BROKEN else None


def _unidentified_message(data: bytes) -> str:
    """The refusal for a file that no allowed plugin accepted."""
    found = _sniff(data)
    if found is None:
        return f"This file is not a readable image. Allowed formats: {ALLOWED_FORMATS_TEXT}."
    kind, description = found
    if kind == _HEIC:
        return _HEIC_MESSAGE
    if kind == _AVIF:
        return _AVIF_MESSAGE
    if kind == _BROKEN:
        return _corrupt_message(description)
    if kind == _IMAGE:
        return _not_allowed_message(description)
    return _not_image_message(description)
