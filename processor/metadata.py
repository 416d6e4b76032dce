"""A photo's metadata, read from image1 and written into its outputs.

What is carried over, in JPEG, PNG and WebP alike (Pillow writes all three into each):

- EXIF: camera make and model, lens, exposure, capture time, MakerNote... as found, with the
  orientation reset to 1 (the pixels are already upright), the pixel dimensions set to the
  output's, and the embedded thumbnail (IFD1) dropped, since it shows the picture before the
  edit. ``Software`` names this program.
- XMP (Lightroom ratings, keywords, ...): as found, its ``tiff:Orientation`` reset to 1, plus a
  description in its own namespace saying the picture was edited: the prompt, the seed, the
  manifest's file name (``qie:Prompt``, ``qie:Seed``, ``qie:Manifest``, ``qie:Software``).
- ICC: the output's own profile (sRGB, or the input's when converted back to it).

``strip_location`` drops GPS (the EXIF GPS IFD and ``exif:GPS*`` in XMP); ``strip_metadata``
drops everything but the colour profile and the provenance. XMP is edited as text (a packet
always closes with ``</rdf:RDF>``), never parsed by an XML parser that could be attacked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from xml.sax.saxutils import escape, quoteattr

from PIL import ExifTags, Image

from stages.colour import source_bits

QIE_NS = "https://github.com/qie-hotfolder/ns/1.0/"
ORIENTATION = ExifTags.Base.Orientation
SOFTWARE = ExifTags.Base.Software
EXIF_WIDTH = ExifTags.Base.ExifImageWidth
EXIF_HEIGHT = ExifTags.Base.ExifImageHeight
ROTATED = (5, 6, 7, 8)  # orientations that swap width and height
# A TIFF's first IFD is its EXIF IFD0 too: its picture-structure tags (sizes, strips, tiles,
# compression, samples), its embedded ICC/XMP/IPTC/Photoshop blocks and the thumbnail pointers
# describe the source file, not the output.
NOT_CARRIED = {256, 257, 258, 259, 262, 263, 266, 269, 273, 277, 278, 279, 280, 281, 284, 292, 293, 317, 320,
               322, 323, 324, 325, 330, 338, 339, 340, 341, 347, 513, 514, 530, 700, 33723, 34377, 34675, 37724,
               50740}


@dataclass(frozen=True)
class SourcePicture:
    """What publishing needs to know about image1's original file."""

    exif: Optional[Image.Exif]
    xmp: Optional[bytes]
    icc: Optional[bytes]
    size: tuple[int, int]  # (width, height), upright
    bits: int  # bits per channel in the file


@dataclass(frozen=True)
class Provenance:
    software: str
    prompt: str
    seed: int
    manifest: str  # the manifest's file name


@dataclass(frozen=True)
class OutputMetadata:
    """What goes into an output file besides its pixels."""

    exif: Optional[bytes] = None  # TIFF-structured EXIF, starting with b"Exif\\0\\0"
    xmp: Optional[bytes] = None
    icc: Optional[bytes] = None


def read_source(path: Path) -> SourcePicture:
    """image1's metadata, without decoding its pixels."""
    with Image.open(path) as picture:
        bits = source_bits(picture)
        exif = picture.getexif()
        xmp = picture.info.get("xmp")
        if isinstance(xmp, str):
            xmp = xmp.encode("utf-8")
        icc = picture.info.get("icc_profile") or None
        width, height = picture.size
    if exif.get(ORIENTATION) in ROTATED:
        width, height = height, width
    return SourcePicture(exif=exif if len(exif) else None, xmp=xmp or None, icc=icc, size=(width, height),
                         bits=bits)


def output_metadata(source: SourcePicture, size: tuple[int, int], icc: Optional[bytes], provenance: Provenance,
                    strip_location: bool, strip_metadata: bool) -> OutputMetadata:
    """The metadata of an output of ``size`` made from ``source``."""
    exif = None if strip_metadata else source.exif
    xmp = None if strip_metadata else source.xmp
    return OutputMetadata(exif=output_exif(exif, size, provenance.software, strip_location),
                          xmp=output_xmp(xmp, provenance, strip_location), icc=icc)


def output_exif(source: Optional[Image.Exif], size: tuple[int, int], software: str, strip_location: bool) -> bytes:
    """EXIF for the output: the source's, upright, without thumbnail (and GPS), naming the software."""
    exif = Image.Exif()
    if source is not None:
        for tag, value in source.items():
            if tag in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo, ExifTags.IFD.Interop) or tag in NOT_CARRIED:
                continue
            exif[tag] = value
        details = dict(source.get_ifd(ExifTags.IFD.Exif))
        if details:
            if EXIF_WIDTH in details or EXIF_HEIGHT in details:
                details[EXIF_WIDTH], details[EXIF_HEIGHT] = size
            exif.get_ifd(ExifTags.IFD.Exif).update(details)
        gps = dict(source.get_ifd(ExifTags.IFD.GPSInfo))
        if gps and not strip_location:
            exif.get_ifd(ExifTags.IFD.GPSInfo).update(gps)
    exif[ORIENTATION] = 1
    exif[SOFTWARE] = software
    return exif.tobytes()


_DESCRIPTION = re.compile(r"<rdf:Description\b[^>]*xmlns:qie=[^>]*?(/>|>.*?</rdf:Description>)", re.S)
_GPS_ATTRIBUTE = re.compile(r"\s+exif:GPS\w+\s*=\s*(\"[^\"]*\"|'[^']*')")
_GPS_ELEMENT = re.compile(r"<exif:(GPS\w+)\b[^>]*?(/>|>.*?</exif:\1>)", re.S)
_ORIENTATION_ATTRIBUTE = re.compile(r"(tiff:Orientation\s*=\s*)(\"[^\"]*\"|'[^']*')")
_ORIENTATION_ELEMENT = re.compile(r"(<tiff:Orientation>)[^<]*(</tiff:Orientation>)")


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot hold (control characters, lone surrogates)."""
    return _NOT_XML.sub("", text)


def output_xmp(source: Optional[bytes], provenance: Provenance, strip_location: bool) -> bytes:
    """The source's XMP packet (upright, perhaps without GPS) with the provenance added; a new
    packet when the source has none (or one that is not a readable packet)."""
    ours = ('<rdf:Description rdf:about="" xmlns:qie="' + QIE_NS + '"'
            f' qie:Software={quoteattr(_xml_text(provenance.software))} qie:Seed="{provenance.seed}"'
            f' qie:Manifest={quoteattr(_xml_text(provenance.manifest))}>'
            f'<qie:Prompt>{escape(_xml_text(provenance.prompt))}</qie:Prompt></rdf:Description>')
    text = None
    if source:
        try:
            text = source.decode("utf-8").rstrip("\x00")
        except UnicodeDecodeError:
            text = None
    if text is None or "</rdf:RDF>" not in text:
        return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
                '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                f'{ours}</rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")
    text = _DESCRIPTION.sub("", text)  # an earlier edit's provenance
    text = _ORIENTATION_ATTRIBUTE.sub(r'\1"1"', text)
    text = _ORIENTATION_ELEMENT.sub(r"\g<1>1\2", text)
    if strip_location:
        text = _GPS_ELEMENT.sub("", _GPS_ATTRIBUTE.sub("", text))
    at = text.rindex("</rdf:RDF>")
    return (text[:at] + ours + text[at:]).encode("utf-8")
