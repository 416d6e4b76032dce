"""What ``status``, ``show`` and ``doctor`` print."""

from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

from config import Settings
from config.untrusted import printable
from db import Database, checkpoints, jobs, utcnow
from db.schema import Event
from processor.estimate import Estimate, queue_estimates
from processor.lease import pid_alive
from sqlalchemy import select


STATUS_SILENT_SECONDS = 10.0  # a running daemon's status file is at most this old


def _age(then) -> str:
    seconds = max((utcnow() - then).total_seconds(), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def progress_bar(step: int, total: int, width: int = 10) -> str:
    filled = width * step // total if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _progress(job) -> str:
    """Sampling: a bar and the step; another stage: that it is under way."""
    if job.state != "running" or not job.stage:
        return ""
    if job.steps_total:
        step = job.step or 0
        return f"{progress_bar(step, job.steps_total)} {step}/{job.steps_total}"
    return "..."


def _eta(estimate: Optional[Estimate], state: str) -> str:
    """``12:03-12:05`` (start-finish) for a queued job, ``12:05`` (finish) for a running one, in local time."""
    if estimate is None:
        return ""
    def local(at):
        return at.replace(tzinfo=timezone.utc).astimezone().strftime("%H:%M:%S")
    return local(estimate.finish) if state == "running" else f"{local(estimate.start)}-{local(estimate.finish)}"


def status_rows(db: Database, include_finished: bool = True, limit: int = 50) -> tuple[list[dict], list[dict]]:
    states = None if include_finished else ["waiting", "queued", "running"]
    estimates = queue_estimates(db, utcnow())
    with db.begin() as session:
        rows = []
        for j in jobs.list_jobs(session, states, limit):
            estimate = estimates.get(j.id)
            rows.append({"id": j.id, "name": j.name, "state": j.state, "stage": j.stage or "",
                         "progress": _progress(j), "step": j.step, "steps_total": j.steps_total, "preset": j.preset,
                         "attempts": j.attempts, "age": _age(j.created_at),
                         "created_at": j.created_at.isoformat() + "Z", "error": j.error or "",
                         "output": j.result.image if j.result else "", "eta": _eta(estimate, j.state),
                         "estimated_start": estimate.start.isoformat() + "Z" if estimate else None,
                         "estimated_finish": estimate.finish.isoformat() + "Z" if estimate else None})
        since = utcnow() - timedelta(hours=1)
        alarms = [{"at": e.at.isoformat() + "Z", "message": e.message}
                  for e in session.scalars(select(Event).where(Event.job_id.is_(None), Event.kind == "alarm",
                                                               Event.at >= since).order_by(Event.id.desc()).limit(1))
                  if e.level == "error"]
    return rows, alarms


def daemon_status(work) -> list[dict[str, Any]]:
    """What each daemon using this work folder last wrote to ``work/status/``: those heard from
    in the last hour, or else the last one."""
    found = []
    for path in sorted((work / "status").glob("*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    found.sort(key=lambda d: d.get("updated_at", ""), reverse=True)
    recent = (utcnow() - timedelta(hours=1)).isoformat()
    shown = [d for d in found if d.get("updated_at", "") >= recent] or found[:1]
    return [{**d, "running": daemon_liveness(d)} for d in shown]


def daemon_liveness(daemon: dict[str, Any], now: Optional[datetime] = None) -> str:
    """``running``; ``stopped`` (it said so, or its process on this machine is gone); or
    ``silent`` (another machine's daemon that has not written its status for STATUS_SILENT_SECONDS:
    stopped, hung or unreachable). The housekeeper writes the file every second."""
    if daemon.get("doing") == "stopped":
        return "stopped"
    host, _, pid = str(daemon.get("worker", "")).rpartition(":")
    pid = str(daemon.get("pid", pid))
    if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
        return "stopped"
    try:
        updated = datetime.fromisoformat(str(daemon.get("updated_at", "")).rstrip("Z"))
    except ValueError:
        return "silent"
    return "running" if ((now or utcnow()) - updated).total_seconds() <= STATUS_SILENT_SECONDS else "silent"


def daemon_line(daemon: dict[str, Any]) -> str:
    cache = daemon.get("model_cache") or {}
    running = daemon.get("running", "running")
    heard = printable(daemon.get("updated_at", ""))[:19]
    worker = printable(daemon.get("worker"))
    if running == "running":
        head = f"daemon {worker} ({heard}): {printable(daemon.get('doing') or 'idle')}"
    else:
        what = "not running" if running == "stopped" else f"not heard from for over {STATUS_SILENT_SECONDS:.0f} s"
        last = daemon.get("doing")
        head = (f"daemon {worker}: {what} (last status {heard}"
                + (f", it was doing: {printable(last)}" if last and last != "stopped" else "") + ")")
    if running != "running":
        return head
    loaded = ", ".join(f"{role} {size / 1e6:.0f} MB" for role, size in (daemon.get("models_loaded") or {}).items())
    loads = ", ".join(f"{role} {n}" for role, n in (cache.get("loads") or {}).items()) or "none"
    unloads = ", ".join(f"{role} {n}" for role, n in (cache.get("unloads") or {}).items()) or "none"
    return (f"{head}\n"
            f"models loaded: {loaded or 'none'}; loads: {loads}; unloads: {unloads}; "
            f"loading took {cache.get('load_seconds', 0):.1f} s")


def inbox_ignored(settings: Settings) -> list[dict[str, str]]:
    """Files in preset folders that no job takes, with the reason."""
    from processor.inbox import ignored_files
    return [{"file": name, "reason": reason} for name, reason in ignored_files(settings.inbox)]


def status_table(rows: list[dict], alarms: list[dict], daemons: Optional[list[dict[str, Any]]] = None,
                 ignored: Optional[list[dict[str, str]]] = None) -> str:
    lines = [f"ALARM {a['at']}: {printable(a['message'])}" for a in alarms]
    lines += [f"IGNORED inbox/{printable(i['file'])}: {printable(i['reason'])}" for i in ignored or ()]
    lines += [daemon_line(daemon) for daemon in daemons or ()]
    if not rows:
        return "\n".join(lines + ["no jobs yet"])
    header = ("ID", "NAME", "STATE", "STAGE", "PROGRESS", "AGE", "ETA", "DETAIL")
    body = [(str(r["id"]), printable(r["name"])[:32], r["state"], printable(r["stage"]), r["progress"], r["age"],
             r["eta"], printable(r["error"] or os.path.basename(r["output"]))[:60]) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(lines + [fmt.format(*header)] + [fmt.format(*b) for b in body])


def job_detail(db: Database, job_id: int) -> Optional[dict[str, Any]]:
    with db.begin() as session:
        job = jobs.get_job(session, job_id)
        if job is None:
            return None
        return {
            "id": job.id, "name": job.name, "state": job.state, "stage": job.stage, "step": job.step,
            "steps_total": job.steps_total, "source": job.source, "preset": job.preset, "priority": job.priority,
            "attempts": job.attempts, "crashes": job.crashes, "error": job.error, "error_kind": job.error_kind,
            "next_attempt_at": job.next_attempt_at, "created_at": job.created_at, "finished_at": job.finished_at,
            "seed": job.spec.seed, "prompt": job.spec.prompt,
            "parameters": job.spec.parameters.model_dump(mode="json"),
            "inputs": [i.model_dump(mode="json") for i in job.inputs],
            "result": job.result.model_dump(mode="json") if job.result else None,
            "stage_runs": [{"stage": r.stage, "cache_hit": r.cache_hit, "duration_s": r.duration_s,
                            "resumed_from_step": r.resumed_from_step, "fingerprint": r.fingerprint[:16],
                            "error": r.error, "started_at": r.started_at}
                           for r in checkpoints.runs_for(session, job_id)],
            "events": [{"at": e.at, "level": e.level, "kind": e.kind, "message": e.message}
                       for e in jobs.events_for(session, job_id)],
        }


def job_detail_text(d: dict[str, Any]) -> str:
    """``show``'s text: every value that came from outside escaped (``config.untrusted``)."""
    p = printable
    lines = [f"job {d['id']} {p(d['name'])}: {d['state']}" + (f" ({p(d['stage'])})" if d["stage"] else ""),
             f"  source: {p(d['source'])}   seed: {d['seed']}   attempts: {d['attempts']}   crashes: {d['crashes']}"
             + (f"   preset: {p(d['preset'])}" if d.get("preset") else ""),
             f"  prompt: {p(d['prompt'])}"]
    if d["error"]:
        lines.append(f"  error ({d['error_kind']}): {p(d['error'])}")
    if d["result"]:
        lines.append(f"  output: {p(d['result']['image'])}")
    lines.append("  stages:")
    for r in d["stage_runs"]:
        how = "reused" if r["cache_hit"] else f"{(r['duration_s'] or 0):.3f}s"
        if r["resumed_from_step"]:
            how += f", resumed after step {r['resumed_from_step']}"
        lines.append(f"    {r['stage']:<14} {how}" + (f"  ERROR {p(r['error'])}" if r["error"] else ""))
    lines.append("  events:")
    lines += [f"    {e['at']:%Y-%m-%d %H:%M:%S} {e['level']:<7} {e['kind']}: {p(e['message'])}" for e in d["events"]]
    return "\n".join(lines)


def doctor(settings: Settings, units: Optional[list[Path]] = None) -> dict[str, Any]:
    """Engine importable, model files found, device and free memory; and whether the systemd
    units installed (or ``units``) can start: their user, groups, program and folders."""
    report: dict[str, Any] = {"engine": settings.engine, "checks": []}

    def check(name: str, ok: bool, detail: str) -> None:
        report["checks"].append({"check": name, "ok": ok, "detail": detail})

    for name, folder in settings.folders().items():
        exists = folder.is_dir()
        free = shutil.disk_usage(folder).free if exists else None
        check(f"folder {name}", exists or name != "inbox",
              f"{folder} " + (f"({free / 1e9:.1f} GB free)" if free is not None else "(will be created)"))
    try:
        import torch
        cuda = torch.cuda.is_available()
        device = torch.cuda.get_device_name(0) if cuda else "cpu"
        mem = (f"{torch.cuda.mem_get_info()[0] / 1e9:.1f} GB free GPU memory" if cuda else "")
        check("torch", True, f"torch {torch.__version__}, device {device} {mem}".strip())
    except ImportError as exc:
        check("torch", False, f"not importable: {exc}")
    try:
        import psutil  # optional
        check("memory", True, f"{psutil.virtual_memory().available / 1e9:.1f} GB RAM available")
    except ImportError:
        pass
    from stages.formats import heif_status
    check("heif", True, heif_status()[1])  # optional: absent is fine, doctor says so
    try:
        from stages.engine import engine_class
        for found in engine_class(settings.engine).diagnose(settings):
            check(found.check, found.ok, found.detail)
            if found.data is not None:
                report[found.check] = found.data
    except ImportError as exc:
        check(settings.engine, False, f"engine not available: {exc}")
    _doctor_units(settings, check, units)
    report["ok"] = all(c["ok"] for c in report["checks"])
    return report


def _doctor_units(settings: Settings, check, units: Optional[list[Path]]) -> None:
    import getpass
    from processor import systemd
    if units is None:
        units = [path for path in systemd.installed_units() if path.is_file()]
    network = systemd.network_uses(settings.model_dump())
    for path in units:
        try:
            text = path.read_text()
        except OSError as exc:
            check(f"unit {path}", False, f"cannot be read: {exc.strerror}")
            continue
        user_unit = systemd.unit_values(text, "Install").get("WantedBy") == ["default.target"]
        problems = systemd.check_unit(text, network, getpass.getuser() if user_unit else "root")
        check(f"unit {path}", not problems, "; ".join(problems) or "its user, groups, program and folders are there")


def doctor_text(report: dict[str, Any]) -> str:
    lines = [f"engine: {report['engine']}"]
    lines += [f"  [{'ok' if c['ok'] else '!!'}] {c['check']}: {c['detail']}" for c in report["checks"]]
    lines.append("all good" if report["ok"] else "problems found (marked !!)")
    return "\n".join(lines)
