#!/usr/bin/env python3
"""Crash campaign: SIGKILL the real daemon at random moments, restart it, repeat, then check
that nothing was lost, duplicated or changed.

    python bench/crash.py [--kills 30] [--seed 1] [--jobs-per-wave 3] [--engine diffusers|fake]

Each life is ``run.py serve --once`` with one kill planned: at a fault point chosen at random
(during ingest, at each stage, while a checkpoint is renamed into place, while publishing) on
its first few passes, or after a random delay. Jobs are dropped in waves, a new wave whenever
the last one is finished. At the end every job must be done exactly once, every output
byte-identical to an uninterrupted run of the same jobs, the outbox free of partial or
duplicate files, and every original archived. ``--engine diffusers`` (the default) computes on
the tiny diffusers model; ``fake`` on the fake engine with every stage taking 0.2 s, which is
what the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.daemon import Folders, make_image, tiny_job  # noqa: E402

FAULT_POINTS = ("ingest.copied", "ingest.recorded", "stage.prepare", "stage.encode_text", "stage.encode_latent",
                "stage.sample", "stage.sample.step1", "stage.sample.step3", "stage.decode", "checkpoint.rename",
                "publish.rename", "publish.image", "publish.manifest")


@dataclass
class Campaign:
    kills: Counter = field(default_factory=Counter)  # where each kill landed
    lives: int = 0
    jobs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def drop(folders: Folders, name: str, index: int) -> None:
    staging = folders.root / f"staging-{name}"
    staging.mkdir()
    make_image(staging / "photo.png", (64, 64), (30 + index * 23 % 200, 90, 200 - index * 11 % 150))
    (staging / "job.json").write_text(json.dumps(tiny_job(seed=index, steps=4)))
    staging.rename(folders.inbox / name)


def unfinished(folders: Folders) -> bool:
    if any(folders.inbox.iterdir()):
        return True
    return bool(folders.db_rows("SELECT id FROM jobs WHERE state NOT IN ('done', 'failed', 'cancelled')"))


def life(folders: Folders, rng: random.Random, campaign: Campaign) -> int:
    """One run of the daemon with one planned kill; returns its exit code."""
    env = folders.env(QIE_SETTLE_SECONDS="0.2", QIE_MAX_CRASHES="1000")
    timer = None
    if rng.random() < 0.3:
        timer = rng.uniform(0.5, 6.0)
        plan = f"after {timer:.1f} s"
    else:
        point = rng.choice(FAULT_POINTS)
        plan = f"{point}@{rng.randint(1, 2)}"
        env["QIE_FAULTS"] = plan
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "serve", "--once"], env=env,
                               cwd=folders.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        code = process.wait(timeout=timer) if timer else process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        code = process.wait()
    campaign.lives += 1
    if code == -signal.SIGKILL:
        campaign.kills[plan if timer is None else "random moment"] += 1
    elif code != 0:
        campaign.problems.append(f"life {campaign.lives} ({plan}) exited {code}")
    return code


FAKE_ENGINE = {"QIE_FAKE__UNIT_SECONDS": "0.2"}  # jobs of about a second, like the tiny model's


def campaign_folders(root: Path, model: Optional[Path]) -> Folders:
    return Folders(root, model, env_extra={} if model else dict(FAKE_ENGINE))


def run_campaign(root: Path, model: Optional[Path], kills: int, seed: int = 1, jobs_per_wave: int = 3) -> Campaign:
    """``model``: the tiny diffusers model; None: the fake engine."""
    rng = random.Random(seed)
    folders = campaign_folders(root / "crashed", model)
    campaign = Campaign()
    while sum(campaign.kills.values()) < kills:
        if not unfinished(folders):
            for _ in range(jobs_per_wave):
                name = f"job-{len(campaign.jobs):03d}"
                drop(folders, name, len(campaign.jobs))
                campaign.jobs.append(name)
        life(folders, rng, campaign)
        if campaign.lives > kills * 4:
            campaign.problems.append("too many lives without a kill")
            break
    for _ in range(3):  # finish without faults
        if not unfinished(folders):
            break
        result = folders.run("serve", "--once", QIE_SETTLE_SECONDS="0.2", QIE_MAX_CRASHES="1000")
        if result.returncode != 0:
            campaign.problems.append(f"final run exited {result.returncode}: {result.stderr[-500:]}")
    check(folders, reference_outputs(root / "reference", model, campaign.jobs), campaign)
    return campaign


def reference_outputs(root: Path, model: Optional[Path], names: list[str]) -> dict[str, bytes]:
    folders = campaign_folders(root, model)
    for index, name in enumerate(names):
        drop(folders, name, index)
    result = folders.run("serve", "--once", QIE_SETTLE_SECONDS="0.2")
    assert result.returncode == 0, result.stderr
    return {p.name: p.read_bytes() for p in folders.outbox.glob("*.png")}


def check(folders: Folders, expected: dict[str, bytes], campaign: Campaign) -> None:
    problems = campaign.problems
    rows = folders.db_rows("SELECT name, state, error FROM jobs")
    made = Counter(name for name, _, _ in rows)
    for name in campaign.jobs:
        if made[name] != 1:
            problems.append(f"{name}: {made[name]} jobs made from one drop")
    for name, state, error in rows:
        if state != "done":
            problems.append(f"{name}: {state}" + (f" ({error})" if error else ""))
    published = {p.name for p in folders.outbox.iterdir()}
    wanted = {f"{n}.png" for n in campaign.jobs} | {f"{n}.json" for n in campaign.jobs}
    if published != wanted:
        problems.append(f"outbox: extra {sorted(published - wanted)}, missing {sorted(wanted - published)}")
    for name, data in expected.items():
        path = folders.outbox / name
        if path.exists() and path.read_bytes() != data:
            problems.append(f"{name}: differs from the uninterrupted run")
    archived = {p.parent.name.split("-", 1)[1] for p in folders.archive.glob("*/job.json")}
    if archived != set(campaign.jobs):
        problems.append(f"originals not archived: {sorted(set(campaign.jobs) - archived)}")
    if any(folders.inbox.iterdir()):
        problems.append(f"inbox not empty: {sorted(p.name for p in folders.inbox.iterdir())}")
    if any(folders.failed.iterdir()):
        problems.append(f"failed/ not empty: {sorted(p.name for p in folders.failed.iterdir())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs-per-wave", type=int, default=3)
    parser.add_argument("--engine", choices=("diffusers", "fake"), default="diffusers")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qie-crash-") as tmp:
        model = None
        if args.engine == "diffusers":
            from stages.tiny_model import build_tiny_model
            model = build_tiny_model(Path(tmp) / "model")
        campaign = run_campaign(Path(tmp), model, args.kills, args.seed, args.jobs_per_wave)
    print(f"\n{sum(campaign.kills.values())} kills in {campaign.lives} lives, {len(campaign.jobs)} jobs, "
          f"{time.monotonic() - started:.0f} s (seed {args.seed}, {args.engine} engine)\n")
    print(f"{'killed at':<28}{'times':>6}")
    for where, count in sorted(campaign.kills.items()):
        print(f"{where:<28}{count:>6}")
    lost = sum(1 for p in campaign.problems if "not archived" in p or "missing" in p)
    print(f"\njobs done exactly once with identical bytes: {len(campaign.jobs) if not campaign.problems else 'NO'}")
    print(f"problems: {len(campaign.problems)} (lost inputs/outputs: {lost})")
    for problem in campaign.problems:
        print(f"  - {problem}")
    raise SystemExit(1 if campaign.problems else 0)


if __name__ == "__main__":
    main()
