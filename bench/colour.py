"""Colour accuracy of prepare + publish: camera JPEGs in Display P3 and Adobe RGB, and a CMYK
JPEG with a profile, through the real daemon (fake engine: the output is the prepared image1),
published as PNG, JPEG and WebP. Prints CIE delta E 1976 of two known patches per output,
computed with NumPy from the colour spaces' definitions (tests/photo_files.py).

    python bench/colour.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.daemon import Folders, tiny_job  # noqa: E402
from tests.photo_files import (CYAN_LAB, PATCH, REST, camera_jpeg, cmyk_jpeg, delta_e76, lab_of,  # noqa: E402
                               patch_mean)

CASES = [(space, fmt, profile) for space in ("Display P3", "Adobe RGB (1998)") for fmt in ("png", "jpg", "webp")
         for profile in ("srgb", "input")]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folders = Folders(Path(tmp))
        for index, (space, fmt, profile) in enumerate(CASES):
            folder = folders.inbox / f"case{index}"
            folder.mkdir()
            camera_jpeg(folder / "photo.jpg", space)
            (folder / "job.json").write_text(json.dumps(tiny_job(image1="photo.jpg", output_format=fmt, quality=100,
                                                                 colour_profile=profile, output_size="input")))
        cmyk = folders.inbox / "cmyk"
        cmyk.mkdir()
        cmyk_jpeg(cmyk / "press.jpg")
        (cmyk / "job.json").write_text(json.dumps(tiny_job(image1="press.jpg")))
        result = folders.run("serve", "--once")
        if result.returncode:
            raise SystemExit(result.stderr)
        print(f"{'input':<18} {'format':<6} {'profile':<8} {'patch dE76':>10} {'rest dE76':>10}")
        for index, (space, fmt, profile) in enumerate(CASES):
            out = folders.outbox / f"case{index}.{fmt}"
            numbers = space if profile == "input" else "sRGB"
            patch = delta_e76(lab_of(patch_mean(out, (0.1, 0.1, 0.4, 0.4)), numbers), lab_of(PATCH, space))
            rest = delta_e76(lab_of(patch_mean(out, (0.6, 0.6, 0.9, 0.9)), numbers), lab_of(REST, space))
            print(f"{space:<18} {fmt:<6} {profile:<8} {patch:>10.2f} {rest:>10.2f}")
        cyan = delta_e76(lab_of(patch_mean(folders.outbox / "cmyk.png", (0.05, 0.1, 0.35, 0.9))), CYAN_LAB)
        naive = delta_e76(lab_of((0, 255, 255)), CYAN_LAB)
        print(f"{'CMYK + profile':<18} {'png':<6} {'srgb':<8} {cyan:>10.2f}  (without the profile: {naive:.1f})")
        p3_as_srgb = delta_e76(lab_of(PATCH, "sRGB"), lab_of(PATCH, "Display P3"))
        print(f"a Display P3 patch read as sRGB (profile ignored): dE76 {p3_as_srgb:.1f}")


if __name__ == "__main__":
    main()
