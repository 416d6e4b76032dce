"""Which picture files the daemon reads: Pillow's own formats, plus HEIC/HEIF through the
optional ``pillow-heif`` plugin (``pip install 'qie-hotfolder[heif]'``) when it is installed.

Pillow 11.3+ reads AVIF itself. Formats Pillow can only identify but not decode without an
outside program or handler (EPS needs Ghostscript; BUFR, GRIB, HDF5, WMF are stubs; MPEG
headers only) do not count as readable.
"""

from __future__ import annotations

import functools
from typing import Optional

from PIL import Image

NOT_DECODABLE = {"EPS", "BUFR", "GRIB", "HDF5", "WMF", "MPEG"}
HEIF_SUFFIXES = (".heic", ".heif", ".heics", ".heifs", ".hif")


def _register_heif() -> Optional[str]:
    """Register pillow-heif's opener; its version, or None when it is not installed."""
    try:
        import pillow_heif
    except ImportError:
        return None
    pillow_heif.register_heif_opener()
    return str(getattr(pillow_heif, "__version__", "unknown version"))


HEIF_PLUGIN = _register_heif()


@functools.cache
def readable_suffixes() -> tuple[str, ...]:
    """File name endings (lower case, with the dot) of the formats the daemon can decode."""
    Image.init()
    return tuple(sorted(suffix for suffix, name in Image.registered_extensions().items()
                        if name in Image.OPEN and name not in NOT_DECODABLE))


def unreadable_reason(name: str) -> str:
    """Why a file named ``name`` is not taken as a picture."""
    lowered = name.lower()
    if lowered.endswith(HEIF_SUFFIXES) and HEIF_PLUGIN is None:
        return ("HEIC/HEIF pictures need the optional pillow-heif plugin, which is not installed "
                "(pip install 'qie-hotfolder[heif]')")
    return "not an image this daemon can read"


def heif_status() -> tuple[bool, str]:
    """(installed, detail) for ``doctor``."""
    if HEIF_PLUGIN is None:
        return False, "pillow-heif not installed: HEIC/HEIF pictures are not read (pip install 'qie-hotfolder[heif]')"
    return True, f"pillow-heif {HEIF_PLUGIN}: HEIC/HEIF pictures are read"
