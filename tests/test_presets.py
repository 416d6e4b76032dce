"""Preset folders through the real daemon: drop photos into ``inbox/make-it-winter/`` and get
edits in ``outbox/make-it-winter/``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.daemon import Folders, make_image


def write_preset(folder: Path, preset: dict) -> None:
    """Write preset.json the careful way: a temporary name, then a rename."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".preset.json.tmp"
    tmp.write_text(json.dumps(preset))
    tmp.rename(folder / "preset.json")


def drop_image(folder: Path, name: str, colour=(120, 170, 230)) -> Path:
    staged = make_image(folder.parent.parent / "staging" / name, (64, 64), colour)
    target = folder / name
    staged.rename(target)
    return target


WINTER = {"prompt": "make it winter", "seed": 4, "megapixels": 0.004, "steps": 2, "output_format": "jpg"}


def test_images_dropped_into_a_preset_folder_become_jobs_published_into_its_outbox_folder(folders: Folders):
    # Preconditions: a preset with a shared reference image, two photos, and a folder job that
    # overrides the seed and the output format.
    winter = folders.inbox / "make-it-winter"
    make_image(winter / "style.png", (64, 64), (250, 250, 250))
    write_preset(winter, {**WINTER, "image2": "style.png"})
    drop_image(winter, "a.png")
    drop_image(winter, "b.jpg", (200, 90, 40))
    (winter / "notes.txt").write_text("not an image: left alone")
    special = winter / "special"
    make_image(special / "x.png")
    (special / "job.json").write_text(json.dumps({"image1": "x.png", "seed": 9, "output_format": "png"}))

    # Action
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr

    # Postconditions: three outputs in the preset's outbox folder, the preset and its reference
    # still in the inbox, the photos gone from it.
    out = folders.outbox / "make-it-winter"
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "a.json", "b.jpg", "b.json", "special.json", "special.png"]
    assert sorted(p.name for p in winter.iterdir()) == ["notes.txt", "preset.json", "style.png"]
    manifest = json.loads((out / "a.json").read_text())
    assert manifest["prompt"] == "make it winter" and manifest["seed"] == 4
    assert manifest["parameters"]["steps"] == 2 and manifest["parameters"]["output_format"] == "jpg"
    assert {(i["key"], i["name"]) for i in manifest["inputs"]} == {("image1", "a.png"), ("image2", "style.png")}
    special_manifest = json.loads((out / "special.json").read_text())
    assert special_manifest["seed"] == 9 and special_manifest["prompt"] == "make it winter"
    assert ("image2", "preset/style.png") in {(i["key"], i["name"]) for i in special_manifest["inputs"]}
    assert folders.db_rows("SELECT name, preset, state FROM jobs ORDER BY name") == [
        ("make-it-winter/a", "make-it-winter", "done"), ("make-it-winter/b", "make-it-winter", "done"),
        ("make-it-winter/special", "make-it-winter", "done")]
    # Originals are archived below the preset's name too.
    archived = sorted(p.name for p in (folders.archive / "make-it-winter").iterdir())
    assert len(archived) == 3 and all(name.split("-", 1)[1] in ("a", "b", "special") for name in archived)

    # The same photo name dropped again gets its own output, never an overwrite.
    drop_image(winter, "a.png", (10, 10, 10))
    assert folders.run("serve", "--once").returncode == 0
    assert (out / "a-1.jpg").exists() and (out / "a.jpg").exists()


def test_a_bad_preset_holds_its_images_with_an_alarm_until_it_is_fixed(folders: Folders):
    broken = folders.inbox / "broken"
    write_preset(broken, {**WINTER, "steps": "many"})
    drop_image(broken, "c.png")

    # --once returns (waiting will not fix the preset); nothing failed, the image is still there.
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    assert (broken / "c.png").exists()
    assert list(folders.failed.iterdir()) == [] and folders.job_states() == {}
    assert "preset broken is not usable" in result.stderr and "field 'steps'" in result.stderr
    status = folders.run("status")
    assert "ALARM" in status.stdout and "broken/preset.json: field 'steps'" in status.stdout

    write_preset(broken, WINTER)
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    assert (folders.outbox / "broken" / "c.jpg").exists()
    assert folders.job_states() == {"broken/c": "done"}
    assert "ALARM" not in folders.run("status").stdout
    assert folders.run("check", str(broken / "preset.json")).returncode == 0


def test_check_names_the_problem_in_a_preset_file(folders: Folders):
    preset = folders.root / "preset.json"
    preset.write_text(json.dumps({"prompt": "x", "image1": "a.png"}))
    result = folders.run("check", str(preset))
    assert result.returncode == 1 and "field 'image1'" in result.stderr and "every image dropped" in result.stderr
