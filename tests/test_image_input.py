"""Portrait loading (avatar.media.load_portrait): everyday files load upright, in sRGB and opaque; oversized and
HEIC files are refused with one clear line."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from avatar.errors import EmoteError
from avatar.media import MAX_IMAGE_PIXELS, decode_image, load_portrait


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _halves(width: int = 40, height: int = 20) -> np.ndarray:
    """Red on the left half, blue on the right."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    return pixels


def test_exif_orientation_is_applied():
    image = Image.fromarray(_halves())
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    data = _encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    upright = load_portrait(data, "phone.jpg")
    assert upright.shape == (40, 20, 3)
    assert upright[2, 10, 0] > 200 and upright[2, 10, 2] < 60  # the red half is now on top
    assert upright[-3, 10, 2] > 200 and upright[-3, 10, 0] < 60
    assert decode_image(data).shape == (20, 40, 3)  # the old decoder keeps its behaviour


def test_alpha_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :4, 3] = 255  # left half opaque red-ish, right half transparent
    rgba[:, 4:, 3] = 0
    rgba[0, 0, 3] = 128
    out = load_portrait(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), "alpha.png")
    assert out.shape == (8, 8, 3)
    assert (out[:, 5:] == 255).all()
    assert tuple(out[1, 1]) == (200, 0, 0)
    assert 120 <= out[0, 0, 1] <= 135  # half-transparent: half way to white


def test_greyscale_and_16_bit():
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    out = load_portrait(_encode(Image.fromarray(grey, "L"), "PNG"), "grey.png")
    assert out.shape == (4, 16, 3) and (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert (out[..., 0] == grey).all()
    deep = np.array([[0, 32768, 65535]], np.uint16)
    out = load_portrait(_encode(Image.fromarray(deep), "PNG"), "deep.png")
    assert out.shape == (1, 3, 3)
    assert list(out[0, :, 0]) == [0, 128, 255]


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan or black, full magenta and yellow: red
    out = load_portrait(_encode(cmyk, "JPEG", quality=95), "print.jpg")
    assert out.shape == (16, 16, 3)
    assert out[8, 8, 0] > 200 and out[8, 8, 1] < 60 and out[8, 8, 2] < 60


def _s15(value: float) -> bytes:
    return struct.pack(">i", int(round(value * 65536)))


def _matrix_profile(red, green, blue, gamma: float = 2.2) -> bytes:
    """A minimal ICC v2 RGB matrix/TRC display profile (D50 white), like Display P3's."""
    def xyz(v) -> bytes:
        return b"XYZ " + b"\0" * 4 + b"".join(_s15(c) for c in v)

    def curve(g: float) -> bytes:
        return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, int(round(g * 256))) + b"\0\0"

    text = b"test profile\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + b"\0" * 81
    white = (0.9642, 1.0, 0.8249)
    tags = [(b"desc", desc), (b"wtpt", xyz(white)), (b"rXYZ", xyz(red)), (b"gXYZ", xyz(green)), (b"bXYZ", xyz(blue)),
            (b"rTRC", curve(gamma)), (b"gTRC", curve(gamma)), (b"bTRC", curve(gamma))]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        data += b"\0" * (-(offset + len(data)) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = struct.pack(">I", offset + len(data)) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
    header += b"\0" * 12 + b"acspAPPL" + b"\0" * 24 + b"".join(_s15(c) for c in white) + b"\0" * 48
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


DISPLAY_P3 = _matrix_profile((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))


def test_icc_profile_is_converted_to_srgb():
    pixels = _halves(16, 16)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = load_portrait(_encode(Image.fromarray(pixels), "PNG", icc_profile=srgb), "tagged.png")
    assert np.abs(out.astype(int) - pixels).max() <= 3
    # Display P3 pixels are more saturated than the same numbers in sRGB: converted, not passed through.
    colour = np.tile(np.array([200, 120, 60], np.uint8), (4, 4, 1))
    p3 = load_portrait(_encode(Image.fromarray(colour), "PNG", icc_profile=DISPLAY_P3), "p3.png")
    assert p3[0, 0, 0] > 205 and p3[0, 0, 2] < 55
    grey = np.full((4, 4, 3), 128, np.uint8)
    p3_grey = load_portrait(_encode(Image.fromarray(grey), "PNG", icc_profile=DISPLAY_P3), "p3-grey.png")
    assert np.ptp(p3_grey[0, 0].astype(int)) <= 2


def test_odd_sizes_load():
    out = load_portrait(_encode(Image.fromarray(np.full((33, 17, 3), 90, np.uint8)), "PNG"), "odd.png")
    assert out.shape == (33, 17, 3)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20_000, int(MAX_IMAGE_PIXELS ** 0.5) + 10])
def test_oversized_image_is_refused_from_its_header(side):
    data = _png_header(side, side)
    assert len(data) < 200  # nothing to decode: only the header says how large it is
    with pytest.raises(EmoteError, match="too large"):
        load_portrait(data, "bomb.png")


def test_heic_is_refused_clearly():
    data = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    with pytest.raises(EmoteError, match="HEIC"):
        load_portrait(data, "photo.heic")


def test_missing_empty_and_garbage(tmp_path):
    with pytest.raises(EmoteError, match="does not exist"):
        load_portrait(tmp_path / "nope.png")
    with pytest.raises(EmoteError, match="empty"):
        load_portrait(b"", "empty.png")
    with pytest.raises(EmoteError, match="not a readable image"):
        load_portrait(b"not an image at all", "junk.png")
