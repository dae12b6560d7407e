"""Tests for blip_app.core.images: every sample is built here, in tmp_path or in memory."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin, TiffImagePlugin, features

from blip_app.core import images
from blip_app.core.images import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    ImageLimits,
    image_digest,
    install_pillow_limits,
    load_image,
)
from blip_app.errors import BadImageError, user_message

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
ALLOWED_TEXT = "Allowed formats: JPEG, PNG, WebP, GIF, BMP."


# ----------------------------------------------------------------------------------------------
# helpers


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def zero_png(width: int, height: int, bit_depth: int = 1) -> bytes:
    """A valid all-black greyscale PNG, written by hand so that no full-size image is allocated."""
    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)  # filter byte + packed samples
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def halves(left: tuple[int, int, int], right: tuple[int, int, int], size: tuple[int, int] = (64, 32)) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def close_to(pixel: object, expected: tuple[int, ...], tolerance: int = 12) -> bool:
    assert isinstance(pixel, tuple), pixel
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def assert_clean_result(result: Image.Image, max_side: int = DEFAULT_MAX_SIDE) -> None:
    assert result.mode == "RGB"
    assert max(result.size) <= max_side
    assert not isinstance(result, ImageFile.ImageFile)
    assert result.info == {}


def refused(source: object, limits: ImageLimits | None = None) -> str:
    with pytest.raises(BadImageError) as info:
        load_image(source, limits or ImageLimits())  # type: ignore[arg-type]
    message = str(info.value)
    # A sentence for people: never Pillow's words or a traceback.
    assert message.endswith(".")
    for leak in ("Traceback", "PIL", "cannot identify", "Errno", "BytesIO", "decompression bomb"):
        assert leak not in message
    assert user_message(info.value) == message
    return message


# ----------------------------------------------------------------------------------------------
# constants and limits


def test_public_constants() -> None:
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    assert DEFAULT_MAX_PIXELS == 40_000_000 and DEFAULT_MAX_SIDE == 2048
    limits = ImageLimits()
    assert (limits.max_pixels, limits.max_side, limits.max_bytes) == (40_000_000, 2048, 20 * 1024 * 1024)
    with pytest.raises(ValueError):
        ImageLimits(max_side=0)


def test_install_pillow_limits_makes_plain_pillow_open_refuse_over_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    over = write(tmp_path, "over.png", zero_png(1001, 1000))
    at_limit = write(tmp_path, "at.png", zero_png(1000, 1000))
    with warnings.catch_warnings(record=True) as caught:  # the warnings filter is restored on exit
        install_pillow_limits(ImageLimits(max_pixels=1_000_000))
        assert Image.MAX_IMAGE_PIXELS == 500_000
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False
        # What gr.Image does with an upload (gradio/image_utils.py: PIL.Image.open(file_path)).
        with pytest.raises(Image.DecompressionBombError):
            Image.open(over)
        with Image.open(at_limit) as image:  # no error at the limit, and no warning below it
            assert image.size == (1000, 1000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    # load_image words Pillow's refusal itself, with the pixel count.
    message = refused(over, ImageLimits(max_pixels=1_000_000))
    assert "1001000 pixels" in message and "limit is 1 megapixels" in message


# ----------------------------------------------------------------------------------------------
# reading the source


def test_empty_input_is_refused(tmp_path: Path) -> None:
    assert refused(b"") == "The file is empty."
    assert refused(write(tmp_path, "empty.jpg", b"")) == "The file is empty."
    assert refused(io.BytesIO()) == "The file is empty."


def test_max_bytes_is_checked_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise(64, 64), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1)

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("parsed a file over max_bytes")

    monkeypatch.setattr(Image, "open", no_parsing)
    assert "the limit is" in refused(data, limits)
    assert "the limit is" in refused(write(tmp_path, "big.png", data), limits)
    assert "larger than" in refused(io.BytesIO(data), limits)
    assert refused(b"x" * 3 * 1024 * 1024, ImageLimits(max_bytes=2 * 1024 * 1024)) == (
        "The file is 3 MB; the limit is 2 MB."
    )


def test_missing_file_gives_a_sentence(tmp_path: Path) -> None:
    assert refused(tmp_path / "gone.png") == "The image file 'gone.png' does not exist."


def test_wrong_source_type_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


def test_all_source_kinds_give_the_same_picture(tmp_path: Path) -> None:
    picture = noise(40, 30)
    data = encode(picture, "PNG")
    path = write(tmp_path, "p.png", data)
    results = [
        load_image(data),
        load_image(path),
        load_image(str(path)),
        load_image(io.BytesIO(data)),
        load_image(picture),
    ]
    assert len({image_digest(r) for r in results}) == 1
    assert results[0].tobytes() == picture.tobytes()


# ----------------------------------------------------------------------------------------------
# formats: from the content, never from the name


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("BMP", {})],
)
def test_allowed_formats_load_whatever_the_name(tmp_path: Path, fmt: str, params: dict[str, object]) -> None:
    picture = halves(RED, BLUE)
    path = write(tmp_path, "picture.tiff", encode(picture, fmt, **params))  # a misleading name
    result = load_image(path)
    assert_clean_result(result)
    assert result.size == picture.size
    assert close_to(result.getpixel((4, 4)), RED) and close_to(result.getpixel((60, 28)), BLUE)


def test_tiff_named_png_is_refused_and_never_parsed_by_the_tiff_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "photo.png", encode(noise(16, 16), "TIFF"))
    with Image.open(path) as image:  # plain Pillow would read it
        assert image.format == "TIFF"
    calls: list[str] = []
    original_open = TiffImagePlugin.TiffImageFile._open

    def spy(self: TiffImagePlugin.TiffImageFile) -> None:
        calls.append("TIFF")
        original_open(self)

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", spy)
    message = refused(path)
    assert (
        message
        == f"This file is a TIFF image (or a camera RAW file), which is not an allowed image format. {ALLOWED_TEXT}"
    )
    assert refused(write(tmp_path, "be.png", b"MM\x00*" + bytes(100))).startswith("This file is a TIFF image")
    # Without the magic-byte wording, the same file is still only offered to the allowed plugins.
    monkeypatch.setattr(images, "_sniff", lambda data: None)
    assert refused(path) == f"This file is not a readable image. {ALLOWED_TEXT}"
    assert calls == []


def test_psd_renamed_png_is_refused_by_magic_bytes(tmp_path: Path) -> None:
    psd = b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, 64, 64, 8, 3) + bytes(200)
    assert refused(write(tmp_path, "art.png", psd)).startswith("This file is a Photoshop (PSD) image, which is not")


def test_pdf_svg_zip_html_text_are_named(tmp_path: Path) -> None:
    pdf = encode(noise(8, 8), "PDF")
    assert refused(write(tmp_path, "a.jpg", pdf)) == f"This file is a PDF document, not an image. {ALLOWED_TEXT}"
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    assert refused(svg).startswith("This file is an SVG (vector) image, which is not an allowed image format.")
    assert refused(b"\xef\xbb\xbf  <svg></svg>").startswith("This file is an SVG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.png", encode(noise(4, 4), "PNG"))
    assert refused(archive.getvalue()).startswith("This file is a ZIP archive")
    assert refused(b"<!DOCTYPE html><html></html>").startswith("This file is an HTML page, not an image.")
    assert refused(b"hello, this is not a picture\n").startswith("This file is a text file, not an image.")


def test_heic_and_avif_are_refused_clearly() -> None:
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    assert refused(heic) == "HEIC images are not supported yet; please convert to JPEG or PNG."
    heif = b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1miafMiHB" + bytes(64)
    assert refused(heif) == "HEIC images are not supported yet; please convert to JPEG or PNG."
    avif = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64)
    assert refused(avif) == "AVIF images are not supported yet; please convert to JPEG or PNG."
    if features.check("avif"):  # a real AVIF, which this Pillow could decode, is still refused
        assert refused(encode(noise(16, 16), "AVIF")).startswith("AVIF images are not supported")
    video = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00isommp42" + bytes(64)
    assert refused(video).startswith("This file is a video")


def test_random_bytes_named_jpg_are_not_an_image(tmp_path: Path) -> None:
    data = b"\x13\x37" + np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert refused(write(tmp_path, "photo.jpg", data)) == f"This file is not a readable image. {ALLOWED_TEXT}"


def test_pil_image_of_a_disallowed_format_is_refused_before_decoding(tmp_path: Path) -> None:
    path = write(tmp_path, "x.tif", encode(noise(16, 16), "TIFF"))
    with Image.open(path) as lazy:  # what gr.Image(image_mode=None, type="pil") can hand over
        assert "TIFF image" in refused(lazy)


# ----------------------------------------------------------------------------------------------
# damaged files


def test_truncated_jpeg_is_refused_and_pillow_setting_untouched(tmp_path: Path) -> None:
    data = encode(noise(256, 256), "JPEG", quality=90)
    message = refused(write(tmp_path, "cut.jpg", data[: len(data) // 2]))
    assert message.startswith("This JPEG file is truncated or corrupt")
    assert refused(data[:20]).startswith("This JPEG file is truncated or corrupt")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_and_corrupt_png_are_refused() -> None:
    data = encode(noise(128, 128), "PNG")
    assert refused(data[: len(data) // 2]).startswith("This PNG file is truncated or corrupt")
    assert refused(data[:30]).startswith("This PNG file is truncated or corrupt")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # damages the zlib stream (and the IDAT checksum)
    assert "truncated or corrupt" in refused(bytes(flipped))


# ----------------------------------------------------------------------------------------------
# size, from the header, before decoding


def test_decompression_bomb_png_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = zero_png(20000, 20000)
    assert len(bomb) < 100_000  # 400 megapixels in about 48 KB
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded pixels of a bomb"))
    # Pillow's default limit: Pillow itself refuses 400 MP when opening (DecompressionBombError).
    message = refused(bomb)
    assert "400000000 pixels (400.0 megapixels)" in message and "the limit is 40 megapixels" in message
    # Pillow's check switched off: load_image's own check, with the dimensions.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert refused(bomb) == "The image is 20000 x 20000 pixels (400.0 megapixels); the limit is 40 megapixels."


def test_100_megapixel_image_is_refused_with_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    data = zero_png(10000, 10000)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded pixels"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's default warns at 89 MP
        message = refused(data)
    assert message == "The image is 10000 x 10000 pixels (100.0 megapixels); the limit is 40 megapixels."


def test_decompression_bomb_warning_raised_as_error_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = zero_png(300, 300)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        message = refused(data)
    assert message == "The image has 90000 pixels (0.1 megapixels); the limit is 0.05 megapixels."


def test_pil_image_input_gets_the_same_size_check() -> None:
    message = refused(Image.new("L", (300, 200)), ImageLimits(max_pixels=50_000))
    assert message == "The image is 300 x 200 pixels (0.1 megapixels); the limit is 0.05 megapixels."
    assert "no pixels" in refused(Image.new("RGB", (0, 0)))


def test_tiny_image_is_accepted() -> None:
    result = load_image(encode(Image.new("RGB", (1, 1), RED), "PNG"))
    assert_clean_result(result)
    assert result.size == (1, 1) and result.getpixel((0, 0)) == RED


@pytest.mark.parametrize("size", [(60000, 2), (2, 60000), (5100, 100)])
def test_thin_images_are_refused(size: tuple[int, int]) -> None:
    message = refused(encode(Image.new("L", size, 128), "PNG"))
    assert message.startswith(f"The image is {size[0]} x {size[1]} pixels, too thin to describe")
    assert "the limit is 50 to 1" in message
    assert refused(Image.new("L", size)).startswith(f"The image is {size[0]} x {size[1]} pixels, too thin")


def test_aspect_ratio_at_the_limit_is_accepted_and_downscaled() -> None:
    result = load_image(encode(Image.new("L", (5000, 100), 128), "PNG"))
    assert_clean_result(result)
    assert result.size == (2048, 41)


def test_long_side_is_capped(tmp_path: Path) -> None:
    result = load_image(write(tmp_path, "wide.png", encode(halves(RED, BLUE, (3000, 1000)), "PNG")))
    assert_clean_result(result)
    assert result.size == (2048, 683)
    assert close_to(result.getpixel((10, 300)), RED) and close_to(result.getpixel((2040, 300)), BLUE)
    small = load_image(write(tmp_path, "tall.png", encode(noise(100, 300), "PNG")), ImageLimits(max_side=150))
    assert small.size == (50, 150)


def test_large_jpeg_is_decoded_at_reduced_scale_with_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(halves(RED, BLUE, (4096, 2048)), "JPEG", quality=90)
    drafted: list[tuple[int, int]] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> object:
        outcome = original_draft(self, mode, size)
        drafted.append(self.size)
        return outcome

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    result = load_image(data, ImageLimits(max_side=512))
    assert drafted == [(512, 256)]  # libjpeg decoded 1/8 of each side
    assert result.size == (512, 256)
    assert close_to(result.getpixel((10, 128)), RED) and close_to(result.getpixel((500, 128)), BLUE)


# ----------------------------------------------------------------------------------------------
# normalisation


def test_16_bit_greyscale_is_stretched_by_its_range_not_clipped() -> None:
    ramp = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    source = Image.fromarray(ramp)
    assert source.mode == "I;16"
    assert source.convert("L").getextrema() == (255, 255)  # the naive conversion: all white
    result = load_image(encode(source, "PNG"))
    assert_clean_result(result)
    grey = np.asarray(result)[:, :, 0]
    assert grey.min() == 0 and grey.max() == 255
    assert 100 < grey.mean() < 155
    assert (np.asarray(result)[:, :, 0] == np.asarray(result)[:, :, 2]).all()


def test_32_bit_int_and_float_images_are_stretched() -> None:
    values = np.linspace(-1.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    as_float = load_image(Image.fromarray(values))
    grey = np.asarray(as_float)[:, :, 0]
    assert grey.min() == 0 and grey.max() == 255
    as_int = load_image(Image.fromarray((values * 100000).astype(np.int32)))
    assert np.asarray(as_int)[:, :, 0].min() == 0 and np.asarray(as_int)[:, :, 0].max() == 255
    with_nan = values.copy()
    with_nan[0, 0] = np.nan
    assert load_image(Image.fromarray(with_nan)).getpixel((31, 31)) == WHITE
    assert load_image(Image.new("I;16", (8, 8), 65535)).getpixel((0, 0)) == WHITE


def test_rgba_is_composited_onto_white() -> None:
    source = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    source.paste((255, 0, 0, 128), (10, 0, 20, 10))
    result = load_image(encode(source, "PNG"))
    assert_clean_result(result)
    assert result.getpixel((2, 5)) == WHITE
    assert close_to(result.getpixel((15, 5)), (255, 127, 127), 2)
    webp = load_image(encode(source, "WEBP", lossless=True))
    assert webp.getpixel((2, 5)) == WHITE


def test_la_and_palette_transparency_are_composited_onto_white() -> None:
    la = Image.new("LA", (10, 10), (0, 0))
    assert load_image(encode(la, "PNG")).getpixel((5, 5)) == WHITE
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (5, 0, 10, 10))
    png = encode(palette, "PNG", transparency=0)  # tRNS chunk: index 0 transparent
    with Image.open(io.BytesIO(png)) as check:
        assert check.mode == "P" and "transparency" in check.info
    result = load_image(png)
    assert result.getpixel((1, 1)) == WHITE and result.getpixel((8, 8)) == RED
    gif = load_image(encode(palette, "GIF", transparency=0))
    assert gif.getpixel((1, 1)) == WHITE and gif.getpixel((8, 8)) == RED
    rgb_trns = encode(Image.new("RGB", (4, 4), BLUE), "PNG", transparency=BLUE)
    assert load_image(rgb_trns).getpixel((0, 0)) == WHITE


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red ink
    result = load_image(encode(cmyk, "JPEG", quality=95))
    assert_clean_result(result)
    assert close_to(result.getpixel((16, 16)), RED, 16)


def test_one_bit_image_becomes_rgb() -> None:
    bilevel = Image.new("1", (16, 8), 0)
    bilevel.paste(1, (8, 0, 16, 8))
    for data in (encode(bilevel, "PNG"), encode(bilevel, "BMP")):
        result = load_image(data)
        assert_clean_result(result)
        assert result.getpixel((2, 2)) == (0, 0, 0) and result.getpixel((12, 2)) == WHITE


def test_animated_gif_and_webp_give_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (24, 24), colour) for colour in (RED, GREEN, BLUE)]
    gif = write(tmp_path, "anim.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50))
    with Image.open(gif) as check:
        assert getattr(check, "n_frames", 1) == 3
    assert load_image(gif).getpixel((12, 12)) == RED
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert load_image(webp).getpixel((12, 12)) == RED
    apng = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert load_image(apng).getpixel((12, 12)) == RED
    # What gr.Image(type="pil") hands over for a .gif: the lazy file, no mode conversion.
    with Image.open(gif) as lazy:
        lazy.seek(2)
        result = load_image(lazy)
    assert_clean_result(result)
    assert result.getpixel((12, 12)) == RED


def test_mpo_is_accepted_as_its_first_frame() -> None:
    data = encode(
        Image.new("RGB", (32, 32), RED), "MPO", save_all=True, append_images=[Image.new("RGB", (32, 32), BLUE)]
    )
    with Image.open(io.BytesIO(data)) as check:
        assert check.format == "MPO" and getattr(check, "n_frames", 1) == 2
    assert close_to(load_image(data).getpixel((16, 16)), RED)


def test_exif_orientation_6_is_turned_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored picture must be turned 90 degrees clockwise for display
    data = encode(halves(RED, BLUE, (64, 32)), "JPEG", quality=95, exif=exif)
    result = load_image(data)
    assert_clean_result(result)
    assert result.size == (32, 64)
    # Turned clockwise, the stored left half (red) is at the top and the right half (blue) at the bottom.
    assert close_to(result.getpixel((16, 8)), RED, 20)
    assert close_to(result.getpixel((16, 56)), BLUE, 20)


def test_pil_image_input_is_normalised_into_a_new_image() -> None:
    source = Image.new("RGBA", (4000, 1000), (0, 0, 0, 0))
    result = load_image(source)
    assert_clean_result(result)
    assert result.size == (2048, 512) and result.getpixel((0, 0)) == WHITE
    rgb = Image.new("RGB", (10, 10), GREEN)
    copy = load_image(rgb)
    assert copy is not rgb and copy.getpixel((0, 0)) == GREEN


# ----------------------------------------------------------------------------------------------
# no references, no leaks


def test_result_is_detached_from_the_file(tmp_path: Path) -> None:
    for fmt in ("JPEG", "PNG", "GIF", "WEBP"):
        path = write(tmp_path, f"x.{fmt.lower()}", encode(noise(40, 40), fmt))
        result = load_image(path)
        path.unlink()
        assert_clean_result(result)
        assert getattr(result, "fp", None) is None
        assert len(result.tobytes()) == 40 * 40 * 3


def test_no_file_handles_leak(tmp_path: Path) -> None:
    paths = []
    for index, (fmt, extra) in enumerate(
        [
            ("JPEG", {}),
            ("PNG", {}),
            ("GIF", {"save_all": True, "append_images": [noise(16, 16, 9)]}),
            ("WEBP", {}),
            ("BMP", {}),
        ]
    ):
        paths.append(write(tmp_path, f"{index}.img", encode(noise(16, 16, index), fmt, **extra)))
    paths.append(write(tmp_path, "bad.tif", encode(noise(8, 8), "TIFF")))
    paths.append(write(tmp_path, "cut.jpg", encode(noise(64, 64), "JPEG")[:300]))

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    for path in paths:  # warm up imports and caches
        with contextlib.suppress(BadImageError):
            load_image(path)
    before = open_fds()
    for _ in range(40):
        for path in paths:
            with contextlib.suppress(BadImageError):
                load_image(path)
    assert open_fds() == before


# ----------------------------------------------------------------------------------------------
# digest


def test_digest_is_the_same_for_the_same_picture_in_png_and_bmp(tmp_path: Path) -> None:
    picture = noise(33, 17, seed=5)
    png = load_image(write(tmp_path, "a.png", encode(picture, "PNG")))
    bmp = load_image(write(tmp_path, "a.bmp", encode(picture, "BMP")))
    assert image_digest(png) == image_digest(bmp)
    assert len(image_digest(png)) == 64 and int(image_digest(png), 16) >= 0
    other = noise(33, 17, seed=6)
    assert image_digest(load_image(encode(other, "PNG"))) != image_digest(png)
    assert image_digest(Image.new("RGB", (2, 3))) != image_digest(Image.new("RGB", (3, 2)))
    assert image_digest(Image.new("L", (2, 2))) != image_digest(Image.new("RGB", (2, 2)))


# ----------------------------------------------------------------------------------------------
# hostile bytes in general


def test_mutated_files_only_ever_raise_bad_image_error() -> None:
    picture = noise(48, 32, seed=3)
    seeds = [
        encode(picture, "JPEG"),
        encode(picture, "PNG"),
        encode(picture, "GIF", save_all=True, append_images=[picture.rotate(90)]),
        encode(picture, "BMP"),
        encode(picture, "WEBP"),
    ]
    rng = np.random.default_rng(7)
    outcomes = {"loaded": 0, "refused": 0}
    for data in seeds:
        for _ in range(80):
            mutated = bytearray(data)
            for _ in range(int(rng.integers(1, 6))):
                position = int(rng.integers(0, len(mutated)))
                mutated[position] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                mutated = mutated[: int(rng.integers(0, len(mutated)))]
            try:
                result = load_image(bytes(mutated))
            except BadImageError:
                outcomes["refused"] += 1
            else:
                assert_clean_result(result)
                outcomes["loaded"] += 1
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0
