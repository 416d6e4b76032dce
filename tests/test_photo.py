"""Photo-grade outputs through the real daemon: image1's metadata and colour carried over, the
picture upright, at the input's size on request, named by a template, 16-bit where asked.

Colour is checked with CIE delta E 1976 computed here from the colour spaces' published
definitions (tests/photo_files.py), not with LittleCMS, which the daemon uses. The tolerance
is 2.0: below one just-noticeable difference (2.3), above what two 8-bit roundings and a lossy
JPEG or WebP at quality 100 of a flat patch cost (at most 1.8 measured, ``bench/colour.py``),
and far below what an ignored profile costs (the Display P3 patch read as sRGB: 12.4; the CMYK
patch converted without its profile: 42.6).
The fake engine's output is its prepared image1, so what is measured is prepare and publish.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import ExifTags, Image

from tests.daemon import Folders, make_image, tiny_job
from tests.photo_files import (CYAN_LAB, PATCH, REST, camera_jpeg, cmyk_jpeg, delta_e76, icc_name, lab_of,
                               patch_mean, png16, png16_pixels, png_bit_depth)

TOLERANCE = 2.0  # delta E 1976, see the module's docstring
PATCH_BOX = (0.1, 0.1, 0.4, 0.4)  # inside the top-left quarter of the upright picture
REST_BOX = (0.6, 0.6, 0.9, 0.9)
HEIF = importlib.util.find_spec("pillow_heif") is not None


def drop(folders: Folders, name: str, job: dict, make: Callable[[Path], object]) -> None:
    """A folder job whose files ``make(folder)`` writes, moved into the inbox whole."""
    staging = folders.root / f"staging-{name}"
    staging.mkdir()
    make(staging)
    (staging / "job.json").write_text(json.dumps(job))
    staging.rename(folders.inbox / name)


def make_preset(folders: Folders, name: str, preset: dict) -> Path:
    folder = folders.inbox / name
    folder.mkdir()
    (folder / ".preset.json.tmp").write_text(json.dumps(preset))
    (folder / ".preset.json.tmp").rename(folder / "preset.json")
    return folder


def into(folder: Path, name: str, make: Callable[[Path], Path]) -> None:
    staged = make(folder.parent.parent / "staging" / name)
    staged.rename(folder / name)


def exif_of(path: Path) -> Image.Exif:
    with Image.open(path) as picture:
        return picture.getexif()


def xmp_of(path: Path) -> str:
    with Image.open(path) as picture:
        picture.load()
        xmp = picture.info.get("xmp") or picture.info.get("XML:com.adobe.xmp") or b""
    return xmp.decode("utf-8") if isinstance(xmp, bytes) else xmp


def run_once(folders: Folders) -> None:
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr


def test_a_camera_jpeg_keeps_its_metadata_and_colour_and_comes_out_upright_in_every_format(folders: Folders):
    # Preconditions: one Display P3 camera JPEG lying on its side (orientation 6), published as
    # PNG, JPEG and WebP at its own size, and as PNG at the model's size.
    for fmt, size in (("png", "input"), ("jpg", "input"), ("webp", "input"), ("png", "model")):
        drop(folders, f"{fmt}-{size}", tiny_job(image1="IMG_0001.jpg", output_format=fmt, output_size=size,
                                                quality=100),
             lambda folder: camera_jpeg(folder / "IMG_0001.jpg", "Display P3"))

    run_once(folders)

    for fmt, size in (("png", "input"), ("jpg", "input"), ("webp", "input"), ("png", "model")):
        name = f"{fmt}-{size}"
        out = folders.outbox / f"{name}.{fmt}"
        manifest = json.loads((folders.outbox / f"{name}.json").read_text())
        # Upright, at the input's size (96x128) or the model's, portrait either way.
        with Image.open(out) as picture:
            width, height = picture.size
        if size == "input":
            assert (width, height) == (96, 128)
        else:
            assert (width, height) == tuple(manifest["output"]["model_size"]) and width * height < 96 * 128
        assert height > width
        assert manifest["output"]["size"] == size and manifest["output"]["colour_profile"] == "sRGB"
        # Colour: the P3 patch keeps its colour in the sRGB output, which says it is sRGB.
        assert icc_name(out).lower().startswith("srgb")
        assert delta_e76(lab_of(patch_mean(out, PATCH_BOX)), lab_of(PATCH, "Display P3")) <= TOLERANCE, fmt
        assert delta_e76(lab_of(patch_mean(out, REST_BOX)), lab_of(REST, "Display P3")) <= TOLERANCE, fmt
        # EXIF: the camera's, orientation 1, no thumbnail, GPS kept (not asked to strip), the software named.
        exif = exif_of(out)
        assert exif[ExifTags.Base.Make] == "Canon" and exif[ExifTags.Base.Model] == "EOS R5"
        assert exif[ExifTags.Base.Orientation] == 1
        assert "qie-hotfolder" in exif[ExifTags.Base.Software]
        details = exif.get_ifd(ExifTags.IFD.Exif)
        assert details[ExifTags.Base.LensModel] == "RF24-70mm F2.8 L IS USM"
        assert details[ExifTags.Base.DateTimeOriginal] == "2024:05:06 07:08:09"
        assert float(details[ExifTags.Base.ExposureTime]) == pytest.approx(0.004)
        assert (details[ExifTags.Base.ExifImageWidth], details[ExifTags.Base.ExifImageHeight]) == (width, height)
        assert exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"
        assert exif.get_ifd(ExifTags.IFD.IFD1) == {}, "the old picture's thumbnail was carried over"
        # XMP: rating and keywords kept, orientation 1, provenance: prompt, seed, manifest.
        xmp = xmp_of(out)
        assert 'xmp:Rating="4"' in xmp and "<rdf:li>harbour</rdf:li>" in xmp
        assert 'tiff:Orientation="1"' in xmp and 'tiff:Orientation="6"' not in xmp
        assert 'qie:Seed="7"' in xmp and f'qie:Manifest="{name}.json"' in xmp
        assert "<qie:Prompt>make the sky purple</qie:Prompt>" in xmp
        assert manifest["output"]["metadata"] == {"from_image1": "exif, xmp", "location": "kept"}


def test_location_or_all_metadata_are_stripped_per_preset_and_names_follow_its_template(folders: Folders):
    private = make_preset(folders, "private", {"prompt": "warmer", "seed": 5, "megapixels": 0.004,
                                               "output_format": "jpg", "strip_location": True,
                                               "name_template": "{preset}-{name}-{seed}-{n}"})
    bare = make_preset(folders, "bare", {"prompt": "cooler", "seed": 6, "megapixels": 0.004,
                                         "strip_metadata": True, "name_template": "{name}_{date}_{time}"})
    into(private, "IMG_0001.jpg", lambda p: camera_jpeg(p, "Adobe RGB (1998)"))
    into(bare, "IMG_0002.jpg", lambda p: camera_jpeg(p, "Adobe RGB (1998)"))

    run_once(folders)
    into(private, "IMG_0001.jpg", lambda p: camera_jpeg(p, "Adobe RGB (1998)"))  # the same photo again
    run_once(folders)

    # Names follow each preset's template; the second drop takes the next number, nothing is overwritten.
    assert sorted(p.name for p in (folders.outbox / "private").iterdir()) == [
        "private-IMG_0001-5-1.jpg", "private-IMG_0001-5-1.json", "private-IMG_0001-5-2.jpg",
        "private-IMG_0001-5-2.json"]
    (bare_image,) = (folders.outbox / "bare").glob("*.png")
    assert re.fullmatch(r"IMG_0002_\d{4}-\d{2}-\d{2}_\d{6}\.png", bare_image.name)

    # strip_location: no GPS in EXIF or XMP; the rest stays.
    out = folders.outbox / "private" / "private-IMG_0001-5-1.jpg"
    exif = exif_of(out)
    assert exif.get_ifd(ExifTags.IFD.GPSInfo) == {} and exif[ExifTags.Base.Make] == "Canon"
    xmp = xmp_of(out)
    assert "GPS" not in xmp and 'xmp:Rating="4"' in xmp and 'qie:Seed="5"' in xmp
    manifest = json.loads((folders.outbox / "private" / "private-IMG_0001-5-1.json").read_text())
    assert manifest["output"]["metadata"]["location"] == "stripped"
    # strip_metadata: nothing of the camera's, but the colour profile and the provenance.
    exif = exif_of(bare_image)
    assert ExifTags.Base.Make not in exif and exif.get_ifd(ExifTags.IFD.GPSInfo) == {}
    assert "qie-hotfolder" in exif[ExifTags.Base.Software]
    xmp = xmp_of(bare_image)
    assert "Rating" not in xmp and "harbour" not in xmp and "GPS" not in xmp and 'qie:Seed="6"' in xmp
    assert icc_name(bare_image).lower().startswith("srgb")
    # Adobe RGB input, sRGB output: the patch keeps its colour.
    assert delta_e76(lab_of(patch_mean(bare_image, PATCH_BOX)), lab_of(PATCH, "Adobe RGB (1998)")) <= TOLERANCE


def test_the_configured_output_defaults_apply_unless_a_job_says_otherwise(folders: Folders):
    folders.env_extra.update({"QIE_OUTPUT__STRIP_LOCATION": "true", "QIE_OUTPUT__NAME_TEMPLATE": "{name}-edit"})
    drop(folders, "quiet", tiny_job(image1="a.jpg"), lambda f: camera_jpeg(f / "a.jpg"))
    drop(folders, "located", tiny_job(image1="b.jpg", strip_location=False, name_template="{name}"),
         lambda f: camera_jpeg(f / "b.jpg"))

    run_once(folders)

    assert exif_of(folders.outbox / "quiet-edit.png").get_ifd(ExifTags.IFD.GPSInfo) == {}
    assert exif_of(folders.outbox / "located.png").get_ifd(ExifTags.IFD.GPSInfo) != {}


def test_colour_profile_input_gives_the_output_the_photos_own_profile(folders: Folders):
    drop(folders, "p3", tiny_job(image1="p3.jpg", colour_profile="input", output_size="input"),
         lambda folder: camera_jpeg(folder / "p3.jpg", "Display P3"))

    run_once(folders)

    out = folders.outbox / "p3.png"
    assert icc_name(out) == "Display P3"
    # The numbers are P3 numbers again, and mean the same colour as the input's.
    assert delta_e76(lab_of(patch_mean(out, PATCH_BOX), "Display P3"), lab_of(PATCH, "Display P3")) <= TOLERANCE
    assert json.loads((folders.outbox / "p3.json").read_text())["output"]["colour_profile"] == "Display P3"


def test_a_cmyk_jpeg_with_a_profile_is_converted_through_its_profile(folders: Folders):
    drop(folders, "press", tiny_job(image1="press.jpg"), lambda folder: cmyk_jpeg(folder / "press.jpg"))

    run_once(folders)

    out = folders.outbox / "press.png"
    cyan = patch_mean(out, (0.05, 0.1, 0.35, 0.9))
    assert delta_e76(lab_of(cyan), CYAN_LAB) <= TOLERANCE, cyan
    assert delta_e76(lab_of((0, 255, 255)), CYAN_LAB) > 20  # what a conversion without the profile gives
    assert patch_mean(out, (0.65, 0.1, 0.95, 0.9)).min() > 240  # paper white stays white


def test_a_16_bit_png_gives_a_16_bit_png_when_asked(folders: Folders):
    drop(folders, "deep", tiny_job(image1="deep.png", bit_depth="input", output_size="input"),
         lambda folder: png16(folder / "deep.png"))
    drop(folders, "shallow", tiny_job(bit_depth="input"), lambda folder: make_image(folder / "photo.png"))
    drop(folders, "plain", tiny_job(image1="deep.png"), lambda folder: png16(folder / "deep.png"))

    run_once(folders)

    deep = folders.outbox / "deep.png"
    assert png_bit_depth(deep) == 16
    pixels = png16_pixels(deep).astype(np.float64) / 65535
    ramp = np.linspace(0, 1, 64)
    assert pixels.shape == (48, 64, 3)
    assert np.abs(pixels[24, 4:-4, 0] - ramp[4:-4]).max() < 0.03  # the ramp, through the model's size and back
    assert np.abs(pixels[24, 4:-4, 2] - 0.25).max() < 0.01
    assert json.loads((folders.outbox / "deep.json").read_text())["output"]["bit_depth"] == 16
    assert png_bit_depth(folders.outbox / "shallow.png") == 8  # an 8-bit input stays 8-bit
    assert png_bit_depth(folders.outbox / "plain.png") == 8  # the default is 8


def test_naming_templates_are_checked_at_ingest(folders: Folders):
    drop(folders, "colon", tiny_job(name_template="{name}:{seed}"), lambda f: make_image(f / "photo.png"))
    drop(folders, "typo", tiny_job(name_template="{nam}"), lambda f: make_image(f / "photo.png"))
    drop(folders, "long", tiny_job(output_name="я" * 150), lambda f: make_image(f / "photo.png"))
    drop(folders, "bit16jpg", tiny_job(bit_depth=16, output_format="jpg"), lambda f: make_image(f / "photo.png"))
    drop(folders, "good", tiny_job(name_template="{name}-{seed}-{n}"), lambda f: make_image(f / "photo.png"))

    run_once(folders)

    assert sorted(p.name for p in folders.outbox.iterdir()) == ["good-7-1.json", "good-7-1.png"]
    reports = {p.name.removesuffix(".error.json"): json.loads(p.read_text())
               for p in folders.failed.glob("*.error.json")}
    assert reports["colon"]["field"] == "name_template" and "':'" in reports["colon"]["error"]
    assert reports["typo"]["field"] == "name_template" and "unknown placeholder {nam}" in reports["typo"]["error"]
    assert reports["long"]["field"] == "output_name" and "is 300 bytes long; at most 200 bytes" in reports["long"]["error"]
    assert reports["bit16jpg"]["field"] == "bit_depth" and "needs output_format png" in reports["bit16jpg"]["error"]


def test_a_camera_jpeg_keeps_its_metadata_through_the_diffusers_engine(diffusers_folders: Folders):
    folders = diffusers_folders
    drop(folders, "real", tiny_job(image1="IMG_0003.jpg", bit_depth=16, steps=2),
         lambda folder: camera_jpeg(folder / "IMG_0003.jpg", "Display P3"))

    run_once(folders)

    out = folders.outbox / "real.png"
    with Image.open(out) as picture:
        width, height = picture.size
    assert height > width  # upright
    assert png_bit_depth(out) == 16
    values = png16_pixels(out)
    assert np.any(values % 257 != 0), "16-bit output holds only 8-bit values"
    exif = exif_of(out)
    assert exif[ExifTags.Base.Make] == "Canon" and exif[ExifTags.Base.Orientation] == 1
    assert exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.LensModel] == "RF24-70mm F2.8 L IS USM"
    assert exif.get_ifd(ExifTags.IFD.IFD1) == {}
    assert 'qie:Manifest="real.json"' in xmp_of(out) and 'xmp:Rating="4"' in xmp_of(out)
    assert icc_name(out).lower().startswith("srgb")
    manifest = json.loads((folders.outbox / "real.json").read_text())
    assert manifest["engine"]["name"] == "diffusers" and manifest["output"]["bit_depth"] == 16


@pytest.mark.skipif(not HEIF, reason="pillow-heif is not installed (pip install 'qie-hotfolder[heif]')")
def test_heic_photos_in_a_preset_folder_are_edited_with_pillow_heif(folders: Folders):
    winter = make_preset(folders, "winter", {"prompt": "snow", "seed": 1, "megapixels": 0.004})

    def heic(path: Path) -> Path:
        import pillow_heif
        pillow_heif.register_heif_opener()
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (200, 30, 40)).save(path, "HEIF")
        return path

    into(winter, "IMG_0004.HEIC", heic)
    run_once(folders)

    out = folders.outbox / "winter" / "IMG_0004.png"
    assert np.abs(patch_mean(out, (0.2, 0.2, 0.8, 0.8)) - (200, 30, 40)).max() < 6


def test_doctor_says_whether_the_heif_plugin_is_there(folders: Folders):
    result = folders.run("doctor", "--json")
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert "pillow-heif" in checks["heif"]["detail"]
    assert ("HEIC/HEIF pictures are read" in checks["heif"]["detail"]) == HEIF


# Reliability items 18 and 19 ------------------------------------------------------------------

def _two_tone(mode: str) -> Image.Image:
    """Left half at 1/4 grey, right half at 3/4, in ``mode``'s own value range."""
    unit = np.full((48, 64), 0.25)
    unit[:, 32:] = 0.75
    if mode == "I;16":
        return Image.fromarray(np.rint(unit * 65535).astype(np.uint16))
    if mode == "I;16B":
        return Image.frombytes(mode, (64, 48), np.rint(unit * 65535).astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(np.rint(unit * (2**31 - 1)).astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray(unit.astype(np.float32), "F")
    grey = Image.fromarray(np.rint(unit * 255).astype(np.uint8), "L")
    if mode == "LAB":
        from PIL import ImageCms
        rgb = grey.convert("RGB")
        return ImageCms.applyTransform(rgb, ImageCms.buildTransform(ImageCms.createProfile("sRGB"),
                                                                    ImageCms.createProfile("LAB"), "RGB", "LAB"))
    return grey.convert(mode)


MODES = [("L", "png"), ("LA", "png"), ("P", "png"), ("RGB", "png"), ("RGBA", "png"),
         ("1", "png"), ("I;16", "png"), ("I;16", "tif"), ("I;16B", "tif"), ("I", "tif"), ("F", "tif"),
         ("CMYK", "jpg"), ("CMYK", "tif"), ("LAB", "tif"), ("YCbCr", "jpg"), ("RGB", "avif")]


def test_every_mode_pillow_opens_becomes_the_right_8_bit_picture(folders: Folders):
    # Preconditions: one job per mode and format, each picture dark on the left, light on the right.
    from PIL import features
    for mode, ext in MODES:
        if ext == "avif" and not features.check("avif"):
            continue
        name = f"{mode.replace(';', '_')}-{ext}"

        def make(folder: Path, mode=mode, ext=ext) -> None:
            picture = _two_tone(mode if mode != "1" else "L")
            if mode == "1":  # dithering would make greys of black and white dots: two flat halves
                picture = Image.fromarray(np.where(np.asarray(picture) > 127, 255, 0).astype(np.uint8)).convert("1")
            picture.save(folder / f"picture.{ext}", **({"quality": 100} if ext in ("jpg", "avif") else {}))
        drop(folders, name, tiny_job(image1=f"picture.{ext}", output_size="input"), make)

    run_once(folders)

    assert not list(folders.failed.iterdir()), [p.name for p in folders.failed.iterdir()]
    for mode, ext in MODES:
        out = folders.outbox / f"{mode.replace(';', '_')}-{ext}.png"
        if ext == "avif" and not out.exists():
            continue
        left, right = patch_mean(out, (0.1, 0.2, 0.4, 0.8)).mean(), patch_mean(out, (0.6, 0.2, 0.9, 0.8)).mean()
        expected = (0, 255) if mode == "1" else (64, 191)
        assert abs(left - expected[0]) <= 4 and abs(right - expected[1]) <= 4, (mode, ext, left, right)
        # A TIFF's picture-structure tags (its first IFD) are not carried over as EXIF.
        assert not {256, 257, 258, 273, 279} & set(exif_of(out)), (mode, ext)


def test_unclear_inputs_are_refused_at_ingest_naming_the_limit_or_accepted(folders: Folders):
    # A PNG with a 4 MB ICC profile (not one LittleCMS reads): accepted, the profile ignored.
    def big_icc(folder: Path) -> None:
        make_image(folder / "raw.png")
        Image.open(folder / "raw.png").save(folder / "photo.png", icc_profile=b"\0" * 4_000_000)
        (folder / "raw.png").rename(folder / "raw.png.part")
    drop(folders, "bigicc", tiny_job(), big_icc)
    # A 30:1 strip: more than max_aspect_ratio (20).
    drop(folders, "strip", tiny_job(), lambda f: make_image(f / "photo.png", (960, 32)))
    # A custom output size meets the same limit.
    drop(folders, "banner", tiny_job(width=16, height=4096), lambda f: make_image(f / "photo.png"))
    # Files in a preset folder that no job takes are named in status.
    winter = make_preset(folders, "winter", {"prompt": "snow", "megapixels": 0.004})
    (winter / "notes.xyz").write_text("not a picture")

    run_once(folders)

    assert (folders.outbox / "bigicc.png").exists()
    report = json.loads((folders.failed / "strip.error.json").read_text())
    assert report["field"] == "image1" and report["stage"] == "ingest"
    assert "960x32 is 30:1, more than max_aspect_ratio=20" in report["error"]
    report = json.loads((folders.failed / "banner.error.json").read_text())
    assert report["field"] == "width" and "16x4096 is 256:1, more than max_aspect_ratio=20" in report["error"]
    status = folders.run("status")
    assert "IGNORED inbox/winter/notes.xyz: not an image this daemon can read" in status.stdout
    assert json.loads(folders.run("status", "--json").stdout)["ignored"] == [
        {"file": "winter/notes.xyz", "reason": "not an image this daemon can read"}]


def test_a_heic_without_the_plugin_is_named_in_status(folders: Folders, monkeypatch):
    from processor import inbox
    from stages import formats
    monkeypatch.setattr(formats, "HEIF_PLUGIN", None)
    monkeypatch.setattr(inbox, "readable_suffixes", lambda: (".png",))
    winter = folders.inbox / "winter"
    winter.mkdir()
    (winter / "preset.json").write_text(json.dumps({"prompt": "snow"}))
    (winter / "IMG_0005.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    assert inbox.ignored_files(folders.inbox) == [
        ("winter/IMG_0005.HEIC", "HEIC/HEIF pictures need the optional pillow-heif plugin, which is not installed "
                                 "(pip install 'qie-hotfolder[heif]')")]


def test_extreme_aspect_ratios_are_refused_at_ingest_with_the_engines_limit(diffusers_folders: Folders):
    folders = diffusers_folders
    # The tiny model's vision area (32x32 pixels) leaves a 4:1 image a short side of 16 pixels, which
    # rounds to 0; 3.5:1 still works.
    drop(folders, "wide", tiny_job(), lambda f: make_image(f / "photo.png", (256, 64)))
    drop(folders, "fine", tiny_job(steps=1), lambda f: make_image(f / "photo.png", (224, 64)))

    run_once(folders)

    assert (folders.outbox / "fine.png").exists()
    report = json.loads((folders.failed / "wide.error.json").read_text())
    assert report["stage"] == "ingest" and report["field"] == "image1"
    assert "256x64 is 4:1; the engine takes less than 4:1" in report["error"]
    assert "1024 pixels" in report["error"]


def test_the_provenance_is_well_formed_xmp_and_an_edit_of_an_edit_keeps_one():
    from xml.dom import minidom

    from processor.metadata import Provenance, output_xmp
    from tests.photo_files import XMP
    first = output_xmp(XMP.encode(), Provenance("qie", 'make <it> & "so"\x01 é', 3, "a.json"), strip_location=True)
    again = output_xmp(first, Provenance("qie", "second", 4, "b.json"), strip_location=False).decode()
    for packet in (first.decode(), again):
        minidom.parseString(packet.split("?>", 1)[1].rsplit("<?xpacket", 1)[0])  # raises when not well-formed
    assert "<qie:Prompt>make &lt;it&gt; &amp; \"so\" é</qie:Prompt>" in first.decode()
    assert again.count("xmlns:qie") == 1 and 'qie:Seed="4"' in again and "GPS" not in again
