"""Real photo files for tests, made here: ICC profiles (Display P3, Adobe RGB, a CMYK printer
profile), a camera JPEG with EXIF (orientation 6, GPS, a thumbnail) and XMP, 16-bit PNGs, and
colour arithmetic (CIE Lab, delta E 1976) done with NumPy, independently of LittleCMS.

The profiles are ICC v2 profiles written from their published definitions: matrix/TRC RGB
profiles (primaries, D65 white point, Bradford-adapted to the D50 connection space) and a
CMYK ``prtr`` profile whose A2B0 is a 2-point lut16 grid to Lab.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import ExifTags, Image

D50 = np.array([0.9642, 1.0, 0.8249])
D65 = np.array([0.95047, 1.0, 1.08883])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])

# (red, green, blue primaries as xy, transfer): the colour spaces' published definitions
SPACES = {
    "Display P3": (((0.680, 0.320), (0.265, 0.690), (0.150, 0.060)), "srgb"),
    "Adobe RGB (1998)": (((0.64, 0.33), (0.21, 0.71), (0.15, 0.06)), 563 / 256),
    "sRGB": (((0.64, 0.33), (0.30, 0.60), (0.15, 0.06)), "srgb"),
}


# Colour arithmetic ------------------------------------------------------------------------------

def rgb_to_xyz_matrix(primaries) -> np.ndarray:
    """RGB (linear) -> XYZ for ``primaries`` with a D65 white."""
    xyz = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in primaries]).T
    scale = np.linalg.solve(xyz, D65)
    return xyz * scale


def adapt_d65_to_d50() -> np.ndarray:
    cone_src, cone_dst = BRADFORD @ D65, BRADFORD @ D50
    return np.linalg.inv(BRADFORD) @ np.diag(cone_dst / cone_src) @ BRADFORD


def linear(values: np.ndarray, transfer) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if transfer == "srgb":
        return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    return v ** transfer


def encoded(values: np.ndarray, transfer) -> np.ndarray:
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1)
    if transfer == "srgb":
        return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)
    return v ** (1 / transfer)


def lab_of(rgb8, space: str = "sRGB") -> np.ndarray:
    """CIE Lab (D50, as ICC) of 8-bit RGB values in ``space``."""
    primaries, transfer = SPACES[space]
    xyz = adapt_d65_to_d50() @ rgb_to_xyz_matrix(primaries) @ linear(np.asarray(rgb8) / 255.0, transfer)
    return xyz_to_lab(xyz)


def xyz_to_lab(xyz: np.ndarray) -> np.ndarray:
    t = np.asarray(xyz) / D50
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def lab_to_xyz(lab) -> np.ndarray:
    L, a, b = lab
    fy = (L + 16) / 116
    f = np.array([fy + a / 500, fy, fy - b / 200])
    t = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    return t * D50


def rgb8_in(space: str, lab) -> np.ndarray:
    """Unrounded 8-bit values of ``lab`` in ``space`` (outside 0..255 when out of gamut)."""
    primaries, transfer = SPACES[space]
    linear_rgb = np.linalg.solve(adapt_d65_to_d50() @ rgb_to_xyz_matrix(primaries), lab_to_xyz(lab))
    if np.any(linear_rgb < -1e-6) or np.any(linear_rgb > 1 + 1e-6):
        return linear_rgb * 1e9  # out of gamut: far out of 0..255
    return encoded(linear_rgb, transfer) * 255.0


def delta_e76(lab1, lab2) -> float:
    return float(np.linalg.norm(np.asarray(lab1) - np.asarray(lab2)))


# ICC profiles -----------------------------------------------------------------------------------

def _s15(value: float) -> bytes:
    return struct.pack(">i", int(round(value * 65536)))


def _xyz_tag(xyz) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in xyz)


def _desc_tag(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * 8 + b"\0\0\0" + b"\0" * 67


def _profile(device_class: bytes, space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    tags = tags + [(b"cprt", b"text\0\0\0\0made for tests\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        while (offset + len(body)) % 4:
            body += b"\0"
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    while len(body) % 4:
        body += b"\0"
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"\0\0\0\0" + bytes([2, 0x10, 0, 0]) + device_class + space + pcs
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + b"".join(_s15(v) for v in D50)
              + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def rgb_profile(space: str) -> bytes:
    """An ICC v2 matrix/TRC profile of ``space`` ("Display P3", "Adobe RGB (1998)")."""
    primaries, transfer = SPACES[space]
    matrix = adapt_d65_to_d50() @ rgb_to_xyz_matrix(primaries)
    if transfer == "srgb":  # a 1024-entry table of the sRGB curve
        table = np.rint(linear(np.linspace(0, 1, 1024), "srgb") * 65535).astype(">u2").tobytes()
        curve = b"curv\0\0\0\0" + struct.pack(">I", 1024) + table
    else:
        curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, int(round(transfer * 256))) + b"\0\0"
    return _profile(b"mntr", b"RGB ", b"XYZ ", [
        (b"desc", _desc_tag(space)), (b"wtpt", _xyz_tag(D50)),
        (b"rXYZ", _xyz_tag(matrix[:, 0])), (b"gXYZ", _xyz_tag(matrix[:, 1])), (b"bXYZ", _xyz_tag(matrix[:, 2])),
        (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)])


# The CMYK profile's corners: Lab of each ink combination (C, M, Y, K each 0 or 100 %).
CYAN_LAB = (62.0, -22.0, -28.0)


def cmyk_corner_lab(c: int, m: int, y: int, k: int) -> tuple[float, float, float]:
    if k:
        return (12.0, 0.0, 0.0)
    if (c, m, y) == (0, 0, 0):
        return (96.0, 0.0, 0.0)
    if (c, m, y) == (1, 0, 0):
        return CYAN_LAB
    if (c, m, y) == (0, 1, 0):
        return (52.0, 70.0, -5.0)
    if (c, m, y) == (0, 0, 1):
        return (90.0, -5.0, 85.0)
    return (25.0 + 10 * (1 - c), 10.0 * (m - c), 10.0 * (y - c))


def cmyk_profile() -> bytes:
    """A CMYK printer profile: A2B0 is a lut16 with a 2-point grid from ink corners to Lab."""
    def lab16(lab) -> bytes:
        L, a, b = lab
        return struct.pack(">HHH", int(round(L / 100 * 65280)), int(round((a + 128) * 256)),
                           int(round((b + 128) * 256)))
    identity = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    grid = b"".join(lab16(cmyk_corner_lab(c, m, y, k)) for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1))
    ramp = struct.pack(">HH", 0, 65535)
    a2b0 = (b"mft2\0\0\0\0" + bytes([4, 3, 2, 0]) + identity + struct.pack(">HH", 2, 2) + ramp * 4 + grid
            + ramp * 3)
    return _profile(b"prtr", b"CMYK", b"Lab ", [(b"desc", _desc_tag("Test CMYK press")), (b"wtpt", _xyz_tag(D50)),
                                                 (b"A2B0", a2b0)])


# Files ------------------------------------------------------------------------------------------

PATCH = (200, 80, 60)  # an orange red, inside sRGB in both P3 and Adobe RGB numbers
REST = (70, 110, 150)


def upright_picture(size: tuple[int, int] = (96, 128), patch=PATCH, rest=REST) -> Image.Image:
    """A portrait picture: the top-left quarter is ``patch``, the rest ``rest``."""
    picture = Image.new("RGB", size, rest)
    picture.paste(patch, (0, 0, size[0] // 2, size[1] // 2))
    return picture


def _exif_with_thumbnail(exif: Image.Exif, thumbnail: bytes) -> bytes:
    """``exif`` as bytes with an IFD1 holding a JPEG thumbnail (Pillow writes no IFD1)."""
    data = bytearray(exif.tobytes())
    assert data[:6] == b"Exif\0\0"
    tiff = data[6:]
    order = "<" if tiff[:2] == b"II" else ">"
    first = struct.unpack_from(order + "I", tiff, 4)[0]
    count = struct.unpack_from(order + "H", tiff, first)[0]
    next_at = first + 2 + 12 * count
    ifd1_at = len(tiff)
    thumb_at = ifd1_at + 2 + 12 * 2 + 4
    ifd1 = struct.pack(order + "H", 2)
    ifd1 += struct.pack(order + "HHII", 0x0201, 4, 1, thumb_at)  # JPEGInterchangeFormat
    ifd1 += struct.pack(order + "HHII", 0x0202, 4, 1, len(thumbnail))  # JPEGInterchangeFormatLength
    ifd1 += struct.pack(order + "I", 0)
    struct.pack_into(order + "I", tiff, next_at, ifd1_at)
    return b"Exif\0\0" + bytes(tiff) + ifd1 + thumbnail


XMP = ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
       '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/"'
       ' xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/"'
       ' xmp:Rating="4" tiff:Orientation="6" exif:GPSLatitude="52,31.2N" exif:GPSLongitude="13,24.0E">'
       '<dc:subject><rdf:Bag><rdf:li>harbour</rdf:li><rdf:li>boats</rdf:li></rdf:Bag></dc:subject>'
       '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>')


def camera_jpeg(path: Path, space: str = "Display P3", size: tuple[int, int] = (96, 128)) -> Path:
    """A camera JPEG: the upright picture stored lying on its side with orientation 6, camera
    EXIF (make, model, lens, exposure, capture time), GPS, a thumbnail, XMP (rating, keywords,
    GPS) and the ICC profile of ``space`` (the pixel numbers are in that space)."""
    stored = upright_picture(size).transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Canon"
    exif[ExifTags.Base.Model] = "EOS R5"
    exif[ExifTags.Base.Orientation] = 6
    details = exif.get_ifd(ExifTags.IFD.Exif)
    details[ExifTags.Base.ExposureTime] = 0.004
    details[ExifTags.Base.FNumber] = 5.6
    details[ExifTags.Base.ISOSpeedRatings] = 200
    details[ExifTags.Base.DateTimeOriginal] = "2024:05:06 07:08:09"
    details[ExifTags.Base.LensModel] = "RF24-70mm F2.8 L IS USM"
    details[ExifTags.Base.ExifImageWidth] = stored.width
    details[ExifTags.Base.ExifImageHeight] = stored.height
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (13.0, 24.0, 0.0)
    thumb = io.BytesIO()
    stored.resize((16, 12)).save(thumb, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, "JPEG", quality=100, subsampling=0, exif=_exif_with_thumbnail(exif, thumb.getvalue()),
                icc_profile=rgb_profile(space), xmp=XMP.encode("utf-8"))
    return path


def cmyk_jpeg(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """A CMYK JPEG with the test printer profile: left half 100 % cyan, right half paper white."""
    pixels = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    pixels[:, : size[0] // 2, 0] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "CMYK").save(path, "JPEG", quality=100, icc_profile=cmyk_profile())
    return path


def png16(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    """A 16-bit RGB PNG (written with pypng; Pillow cannot): a horizontal ramp in red and green,
    blue constant at 1/4."""
    import png
    width, height = size
    ramp = np.linspace(0, 65535, width)
    pixels = np.zeros((height, width, 3), dtype=np.uint16)
    pixels[..., 0] = np.rint(ramp).astype(np.uint16)
    pixels[..., 1] = np.rint(65535 - ramp).astype(np.uint16)
    pixels[..., 2] = 16384
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        png.Writer(width, height, greyscale=False, bitdepth=16).write(handle, pixels.reshape(height, width * 3))
    return path


def png_bit_depth(path: Path) -> int:
    import png
    return int(png.Reader(filename=str(path)).read()[3]["bitdepth"])


def png16_pixels(path: Path) -> np.ndarray:
    import png
    width, height, rows, info = png.Reader(filename=str(path)).asRGB()
    return np.array([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, 3)


def patch_mean(path: Path, box: tuple[float, float, float, float]) -> np.ndarray:
    """Mean 8-bit RGB of ``box`` (fractions: left, top, right, bottom) of a picture, as stored."""
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float64)
    h, w = pixels.shape[:2]
    left, top, right, bottom = box
    return pixels[int(top * h):int(bottom * h), int(left * w):int(right * w)].reshape(-1, 3).mean(axis=0)


def icc_name(path: Path) -> Optional[str]:
    from PIL import ImageCms
    with Image.open(path) as picture:
        icc = picture.info.get("icc_profile")
    if not icc:
        return None
    return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()
