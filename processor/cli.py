"""Command line: ``python run.py COMMAND`` (or the ``qie-hotfolder`` script)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

from config import ConfigurationError, JobFileError, Settings, job_schema, load_settings, parse_job_file

log = logging.getLogger("qie")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


class UserError(Exception):
    """A command that cannot do what was asked; printed without a traceback."""


# Settings and logging ----------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (override the config file and QIE_* variables)")
    group.add_argument("--config", metavar="FILE", help="TOML settings file (default: ./qie-hotfolder.toml if present)")
    for flag, help_text in (("inbox", "inbox folder"), ("outbox", "outbox folder"), ("failed", "failed folder"),
                            ("archive", "archive folder"), ("work", "work folder (checkpoints)"),
                            ("state", "SQLite database file"), ("database-url", "SQLAlchemy database URL"),
                            ("engine", "diffusers or comfyui"), ("model-path", "diffusers model folder"),
                            ("comfyui-path", "ComfyUI checkout"), ("device", "auto, cpu, cuda, cuda:N"),
                            ("dtype", "auto, float32, bfloat16, float16"), ("log-level", "DEBUG, INFO, WARNING, ERROR")):
        group.add_argument(f"--{flag}", dest=flag.replace("-", "_"), metavar=flag.split("-")[-1].upper(), help=help_text)
    group.add_argument("--log-json", action="store_true", default=None, help="log JSON lines")


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    keys = ("inbox", "outbox", "failed", "archive", "work", "state", "database_url", "engine", "model_path",
            "comfyui_path", "device", "dtype", "log_level", "log_json")
    overrides = {key: getattr(args, key, None) for key in keys}
    overrides.update(extra)
    return load_settings(getattr(args, "config", None), **overrides)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for noisy in ("watchdog", "PIL", "urllib3", "httpx", "filelock", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_db(settings: Settings, create: bool = False):
    from db import Database, DatabaseError
    try:
        return Database(settings.url, create=create)
    except DatabaseError as exc:
        raise UserError(str(exc)) from exc


# Commands ----------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from db import DatabaseError
    from processor.daemon import AlreadyRunning, Daemon
    extra = {"watch_mode": "polling"} if args.polling else {}
    settings = settings_from(args, **extra)
    setup_logging(settings)
    try:
        return Daemon(settings, once=args.once).serve()
    except (AlreadyRunning, DatabaseError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1


def cmd_submit(args: argparse.Namespace) -> int:
    from processor.submit import submit
    settings = settings_from(args)
    placed = submit(Path(args.file), settings)
    print(f"submitted: {placed}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from processor.report import status_rows, status_table
    settings = settings_from(args)
    db = open_db(settings)
    rows, alarms = status_rows(db, include_finished=not args.active, limit=args.limit)
    if args.json:
        print(json.dumps({"jobs": rows, "alarms": alarms}, indent=2))
    else:
        print(status_table(rows, alarms))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from processor.report import job_detail, job_detail_text
    settings = settings_from(args)
    detail = job_detail(open_db(settings), args.id)
    if detail is None:
        raise UserError(f"no job {args.id}")
    print(json.dumps(detail, indent=2, default=str) if args.json else job_detail_text(detail))
    return 0


def _transition(args: argparse.Namespace, action: str) -> int:
    from db import jobs
    settings = settings_from(args)
    db = open_db(settings)
    try:
        with db.begin() as session:
            job = getattr(jobs, action)(session, args.id)
            state = job.state
    except jobs.TransitionError as exc:
        raise UserError(str(exc)) from exc
    print(f"job {args.id}: {state}" + (" (cancel requested; stops at the next step)" if state == "running" else ""))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    return _transition(args, "retry")


def cmd_cancel(args: argparse.Namespace) -> int:
    return _transition(args, "cancel")


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(job_schema(), indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    path = Path(args.file)
    try:
        job, params = parse_job_file(path.read_bytes(), str(path), settings.defaults)
    except JobFileError as exc:
        raise UserError(str(exc)) from exc
    print(json.dumps({"job_file": job.model_dump(exclude_none=True, mode="json"),
                      "effective_parameters": params.model_dump(mode="json")}, indent=2))
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from stages.tiny_model import build_tiny_model
    target = Path(args.dir)
    if target.exists() and any(target.iterdir()) and not args.force:
        raise UserError(f"{target} is not empty (use --force to replace it)")
    if args.force and target.exists():
        shutil.rmtree(target)
    build_tiny_model(target, seed=args.seed)
    print(f"tiny random model written to {target}\n"
          "Its outputs are noise: it exercises the real code, not the real weights.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from processor.demo import run_demo
    return run_demo(Path(args.folder))


def cmd_doctor(args: argparse.Namespace) -> int:
    from processor.report import doctor, doctor_text
    settings = settings_from(args)
    report = doctor(settings)
    print(json.dumps(report, indent=2, default=str) if args.json else doctor_text(report))
    return 0 if report["ok"] else 1


def cmd_docs(args: argparse.Namespace) -> int:
    from config.reference import write_docs
    for path in write_docs(Path(args.out)):
        print(f"wrote {path}")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from db import current_revision, head_revision, upgrade
    from db.database import create_db_engine
    settings = settings_from(args)
    before = current_revision(create_db_engine(settings.url))
    upgrade(settings.url)
    print(f"database {settings.url}: {before or 'new'} -> {head_revision()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qie-hotfolder",
                                     description="Turn a folder into a Qwen-Image-Edit-2509 image-editing service.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler, help_text: str, settings: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if settings:
            _common(sub)
        sub.set_defaults(handler=handler)
        return sub

    serve = command("serve", cmd_serve, "watch the inbox and process jobs until stopped")
    serve.add_argument("--once", action="store_true", help="process what is in the inbox and queue, then exit")
    serve.add_argument("--polling", action="store_true", help="poll the inbox (network shares) instead of inotify")

    submit = command("submit", cmd_submit, "copy a job file and its images into the inbox, atomically")
    submit.add_argument("file", help="job JSON file (its images are found beside it)")

    status = command("status", cmd_status, "show where every job is")
    status.add_argument("--json", action="store_true")
    status.add_argument("--active", action="store_true", help="only jobs not finished")
    status.add_argument("--limit", type=int, default=50)

    show = command("show", cmd_show, "show one job: parameters, stages, events")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true")

    retry = command("retry", cmd_retry, "queue a failed or cancelled job again")
    retry.add_argument("id", type=int)
    cancel = command("cancel", cmd_cancel, "cancel a queued job, or stop a running one at its next step")
    cancel.add_argument("id", type=int)

    command("schema", cmd_schema, "print the job file's JSON Schema", settings=False)
    check = command("check", cmd_check, "validate a job file and print its effective parameters")
    check.add_argument("file")

    tiny = command("make-tiny-model", cmd_make_tiny_model,
                   "build a tiny random-weight Qwen-Image-Edit-Plus model (diffusers format) offline. "
                   "Its outputs are noise: it exercises the real code, not the real weights.", settings=False)
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--force", action="store_true", help="replace an existing folder")

    demo = command("demo", cmd_demo, "build the tiny model, drop a sample job into a demo folder, process it, "
                   "print where the result is (outputs are noise)", settings=False)
    demo.add_argument("--folder", default="demo", help="demo folder (default: ./demo)")

    doctor_cmd = command("doctor", cmd_doctor, "check the engine, model files, device and free memory")
    doctor_cmd.add_argument("--json", action="store_true")

    docs = command("docs", cmd_docs, "regenerate docs/configuration.md and docs/job-file.md", settings=False)
    docs.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"))

    command("db-upgrade", cmd_db_upgrade, "upgrade the database schema to this version (back it up first)")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
