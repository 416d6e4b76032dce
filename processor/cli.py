"""Command line: ``python run.py COMMAND`` (or the ``qie-hotfolder`` script)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

from config import CLI_FLAGS, ConfigurationError, JobFileError, Settings, job_schema, load_settings, parse_job_file
from config.untrusted import printable
from processor.exits import EXIT_CONFIGURATION, EXIT_DATABASE, EXIT_RESTART, EXIT_USER

log = logging.getLogger("qie")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_CONFIGURATION
    from db import DatabaseError
    try:
        return args.handler(args)
    except ConfigurationError as exc:
        print(f"configuration error: {printable(exc)}", file=sys.stderr)
        return EXIT_CONFIGURATION
    except DatabaseError as exc:
        print(f"database error: {printable(exc)}", file=sys.stderr)
        return EXIT_DATABASE
    except UserError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return EXIT_USER


class UserError(Exception):
    """A command that cannot do what was asked; printed without a traceback."""


# Settings and logging ----------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser) -> None:
    """The settings flags, one per name in ``config.CLI_FLAGS``, described by the setting itself."""
    group = parser.add_argument_group("settings (override the config file and QIE_* variables)")
    group.add_argument("--config", metavar="FILE", help="TOML settings file (default: ./qie-hotfolder.toml if present)")
    for name in CLI_FLAGS:
        field = Settings.model_fields[name]
        flag = f"--{name.replace('_', '-')}"
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action="store_true", default=None, help=field.description)
        else:
            group.add_argument(flag, dest=name, metavar=name.rsplit("_", 1)[-1].upper(), help=field.description)


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {name: getattr(args, name, None) for name in CLI_FLAGS}
    overrides.update(extra)
    return load_settings(getattr(args, "config", None), **overrides)


def setup_logging(settings: Settings) -> None:
    from processor.logs import configure_for
    configure_for(settings)


def open_db(settings: Settings, create: bool = False):
    from db import Database
    return Database(settings.url, create=create)


# Commands ----------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from processor.daemon import Daemon
    extra = {"watch_mode": "polling"} if args.polling else {}
    settings = settings_from(args, **extra)
    setup_logging(settings)
    return _run_daemon(Daemon(settings, once=args.once))


def cmd_worker(args: argparse.Namespace) -> int:
    from processor.daemon import Daemon
    from processor.scheduler import claimed_stages
    try:
        stages = claimed_stages(args.stages.split(",")) if args.stages else None
    except ValueError as exc:
        raise UserError(f"--stages: {exc}") from exc
    extra = {"watch_mode": "polling"} if args.polling else {}
    settings = settings_from(args, **extra)
    setup_logging(settings)
    return _run_daemon(Daemon(settings, once=args.once, stages=stages, ingest=args.ingest, drain=True))


def _run_daemon(daemon) -> int:
    """Serve until stopped; one log line and a distinct exit status when it cannot start."""
    from db import DatabaseError
    from processor.daemon import AlreadyRunning
    try:
        return {"restart": EXIT_RESTART, "incomplete": EXIT_USER}.get(daemon.serve(), 0)
    except DatabaseError as exc:
        log.error("%s", exc)
        return EXIT_DATABASE  # restarting will not help: the unit's RestartPreventExitStatus
    except (AlreadyRunning, FileNotFoundError) as exc:
        log.error("%s", exc)
        return EXIT_USER


def cmd_submit(args: argparse.Namespace) -> int:
    from processor.submit import submit
    settings = settings_from(args)
    placed = submit(Path(args.file), settings)
    print(f"submitted: {printable(placed)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from processor.report import daemon_status, inbox_ignored, status_rows, status_table
    settings = settings_from(args)
    db = open_db(settings)
    if args.watch:
        return _watch_status(db, args, settings)
    rows, alarms = status_rows(db, include_finished=not args.active, limit=args.limit)
    daemon = daemon_status(settings.work)
    ignored = inbox_ignored(settings)
    if args.json:
        print(json.dumps({"jobs": rows, "alarms": alarms, "daemons": daemon, "ignored": ignored}, indent=2))
    else:
        print(status_table(rows, alarms, daemon, ignored))
    return 0


def _watch_status(db, args: argparse.Namespace, settings: Settings) -> int:
    """``status --watch``: the table again every ``--interval`` seconds until Ctrl-C; on a
    terminal the screen is cleared first (elsewhere, and with ``--json``, one after another)."""
    import time
    from processor.report import daemon_status, status_rows, status_table
    terminal = sys.stdout.isatty() and not args.json
    try:
        while True:
            rows, alarms = status_rows(db, include_finished=not args.active, limit=args.limit)
            if args.json:
                print(json.dumps({"at": datetime.now().isoformat(timespec="seconds"), "jobs": rows, "alarms": alarms}))
            else:
                heading = (f"qie-hotfolder  {datetime.now():%Y-%m-%d %H:%M:%S}  "
                           f"(every {args.interval:g}s, Ctrl-C to quit)")
                print(("\x1b[H\x1b[2J" if terminal else "") + heading + "\n\n"
                      + status_table(rows, alarms, daemon_status(settings.work))
                      + ("" if terminal else "\n"))
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # piped into head and the reader went away
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
    from processor import actions
    settings = settings_from(args)
    db = open_db(settings)
    try:
        state = getattr(actions, action)(settings, db, args.id).state
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
    from config import job_over_preset, parse_preset
    from processor.inbox import PRESET_FILE
    settings = settings_from(args)
    path = Path(args.file)
    if path.name == PRESET_FILE:
        try:
            preset = parse_preset(path.read_bytes(), str(path), settings.defaults)
            job, params = job_over_preset(preset, None, "image.png", str(path), settings.defaults)
        except JobFileError as exc:
            raise UserError(str(exc)) from exc
        print(json.dumps({"preset": preset, "effective_parameters": params.model_dump(mode="json"),
                          "effective_output": job.output_options(settings.output).model_dump(mode="json")}, indent=2))
        return 0
    try:
        job, params = parse_job_file(path.read_bytes(), str(path), settings.defaults)
    except JobFileError as exc:
        raise UserError(str(exc)) from exc
    print(json.dumps({"job_file": job.model_dump(exclude_none=True, mode="json"),
                      "effective_parameters": params.model_dump(mode="json"),
                      "effective_output": job.output_options(settings.output).model_dump(mode="json")}, indent=2))
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
    report = doctor(settings, [Path(unit) for unit in args.unit] if args.unit else None)
    print(json.dumps(report, indent=2, default=str) if args.json else doctor_text(report))
    return 0 if report["ok"] else 1


def cmd_docs(args: argparse.Namespace) -> int:
    from config.reference import write_docs
    for path in write_docs(Path(args.out)):
        print(f"wrote {path}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from db import utcnow
    from processor.retention import collect
    settings = settings_from(args)
    report = collect(settings, open_db(settings), utcnow(), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for item in report.removed:
        print(f"{verb} {item.kind} {printable(item.path)} ({item.bytes} bytes): {printable(item.reason)}")
    print(report.summary())
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    import getpass
    import os
    from config import DEFAULT_CONFIG_FILE
    from processor import systemd
    settings = settings_from(args)
    root = Path(__file__).resolve().parent.parent
    config = Path(args.config) if args.config else Path(DEFAULT_CONFIG_FILE)
    user = None if args.user_unit else (args.run_as or os.environ.get("SUDO_USER") or getpass.getuser())
    state = settings.state if settings.database_url is None else None
    network = systemd.network_uses(settings.model_dump())
    options = systemd.UnitOptions(
        python=sys.executable, run_py=str(root / "run.py"), working_directory=os.getcwd(),
        config_file=str(config.resolve()) if config.is_file() else None,
        writable=systemd.writable_paths(settings.folders(), state), readable=systemd.readable_paths(settings, root),
        user=user, groups=[] if args.user_unit else systemd.service_groups(),
        user_unit=args.user_unit, network=network, systemd_version=systemd.installed_version(),
        watchdog_seconds=settings.watchdog_seconds, stop_timeout=settings.stop_timeout,
        extra_args=_setting_flags(args, settings),
        environment={k: v for k, v in os.environ.items() if k.startswith("QIE_")})
    text = systemd.unit_text(options)
    check = functools.partial(systemd.check_unit, text, network, user or getpass.getuser())
    if args.print_only:
        print(text, end="")
        for problem in check():
            print(f"note: {problem}", file=sys.stderr)
        return 0
    if args.output:
        target = Path(args.output)
    else:
        target = systemd.installed_units(args.name)[1 if args.user_unit else 0]
    _make_folders([*settings.folders().values(), *([state.parent] if state else [])], user)
    problems = check()
    if problems:  # a unit that cannot start is not written
        raise UserError("the unit would not work:\n  " + "\n  ".join(problems))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    except PermissionError as exc:
        raise UserError(f"cannot write {target} ({exc.strerror}): run it with sudo, or use --user, "
                        "--output FILE or --print") from exc
    ctl = "systemctl --user" if args.user_unit else "sudo systemctl"
    journal = "journalctl --user" if args.user_unit else "journalctl"
    unit = target.stem  # systemd names a unit after its file
    install = f"{ctl} link {target.resolve()} && " if args.output else ""
    print(f"wrote {target}\n"
          f"next:  {install}{ctl} daemon-reload && {ctl} enable --now {unit}\n"
          f"log:   {journal} -u {unit} -f\n"
          f"state: {ctl.replace('sudo ', '')} status {unit}   (the STATUS line shows the job, stage and step)")
    if user == "root":
        print("note: the service runs as root; --run-as USER picks a less privileged account", file=sys.stderr)
    if state is not None and str(state.parent) == os.getcwd():
        print(f"note: the database is in the working folder, so all of {state.parent} is writable for the service; "
              "set `state` to a file in a folder of its own for tighter sandboxing", file=sys.stderr)
    return 0


def _make_folders(folders: list[Path], user: Optional[str]) -> None:
    """Create the folders the unit names (``ReadWritePaths=`` of a missing one stops it); those
    created as root for another account are given to that account."""
    import os
    import pwd
    try:
        owner = pwd.getpwnam(user) if user and user != "root" and os.geteuid() == 0 else None
    except KeyError:
        owner = None  # the check that follows says so
    for folder in folders:
        created = [path for path in (folder, *folder.parents) if not path.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        for path in created if owner is not None else ():
            os.chown(path, owner.pw_uid, owner.pw_gid)


def _setting_flags(args: argparse.Namespace, settings: Settings) -> list[str]:
    """The settings given as flags to this command, passed on to ``serve`` (paths made absolute)."""
    flags = []
    for name in CLI_FLAGS:
        if getattr(args, name, None) is None:
            continue
        value = getattr(settings, name)
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            flags += [flag] if value else []
        else:
            flags += [flag, str(value.value if hasattr(value, "value") else value)]
    return flags


def cmd_web(args: argparse.Namespace) -> int:
    from web import WebServer
    settings = settings_from(args)
    setup_logging(settings)
    if settings.http_listen == "off":
        raise UserError("http_listen is off: give --http-listen HOST:PORT")
    open_db(settings).close()  # no database yet: say so plainly
    server = WebServer(settings)  # a non-loopback address without a token: a configuration error
    try:
        return server.run()
    except OSError as exc:
        raise UserError(f"cannot listen on {settings.http_listen}: {exc.strerror or exc}") from exc


def cmd_http_token(args: argparse.Namespace) -> int:
    from web import make_token_file
    from web.security import read_token_file
    settings = settings_from(args)
    path = settings.effective_http_token_file
    token = None if args.new else read_token_file(path)
    if token is None:
        token = make_token_file(path)
        print(f"wrote a new token to {path} (mode 0600); the daemon reads it at its next start")
    else:
        print(f"{path} already holds a token (--new replaces it)")
    if args.show:
        print(token)
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

    worker = command("worker", cmd_worker, "run stages of jobs from a queue shared through PostgreSQL "
                     "(docs/scaling.md); it does not watch the inbox unless --ingest")
    worker.add_argument("--stages", metavar="LIST",
                        help="comma-separated stages to claim, e.g. encode_text,encode_latent,decode or sample "
                             "(default: all); prepare goes with the encoders, publishing with decode")
    worker.add_argument("--ingest", action="store_true", help="also watch the inbox and ingest jobs "
                        "(with PostgreSQL one daemon at a time scans it)")
    worker.add_argument("--once", action="store_true",
                        help="exit when the queue is drained: no job running, due, or waiting for a retry")
    worker.add_argument("--polling", action="store_true", help="with --ingest: poll the inbox instead of inotify")

    submit = command("submit", cmd_submit, "copy a job file and its images into the inbox, atomically")
    submit.add_argument("file", help="job JSON file (its images are found beside it)")

    status = command("status", cmd_status, "show where every job is")
    status.add_argument("--json", action="store_true")
    status.add_argument("--active", action="store_true", help="only jobs not finished")
    status.add_argument("--limit", type=int, default=50)
    status.add_argument("--watch", action="store_true", help="a live view: refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh interval of --watch (default 1)")

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

    doctor_cmd = command("doctor", cmd_doctor, "check the engine, model files, device and free memory, and "
                         "whether the installed systemd unit can start")
    doctor_cmd.add_argument("--json", action="store_true")
    doctor_cmd.add_argument("--unit", action="append", metavar="FILE",
                            help="check this unit file (default: the installed qie-hotfolder units)")

    docs = command("docs", cmd_docs, "regenerate docs/configuration.md and docs/job-file.md", settings=False)
    docs.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"))

    command("web", cmd_web, "serve the web pages, JSON API and /metrics from this process, reading the same "
            "database and folders as the daemon (docs/web.md)")
    token = command("http-token", cmd_http_token, "generate the token the web server needs on a non-loopback "
                    "address, in http_token_file (mode 0600)")
    token.add_argument("--new", action="store_true", help="replace an existing token")
    token.add_argument("--show", action="store_true", help="print the token")

    command("db-upgrade", cmd_db_upgrade, "upgrade the database schema to this version (back it up first)")

    gc = command("gc", cmd_gc, "remove old checkpoints, archived originals and finished jobs' work folders "
                 "(the daemon also does it every gc_interval)")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    gc.add_argument("--json", action="store_true")

    service = command("install-service", cmd_install_service,
                      "write a systemd unit that runs `serve` with these settings (see docs/operations.md)")
    service.add_argument("--print", dest="print_only", action="store_true", help="print the unit instead of writing it")
    service.add_argument("--output", metavar="FILE", help="write the unit here (default: /etc/systemd/system/NAME.service, "
                         "with --user ~/.config/systemd/user/NAME.service)")
    service.add_argument("--user", dest="user_unit", action="store_true",
                         help="a unit for `systemctl --user`: no root needed, less sandboxing")
    service.add_argument("--run-as", metavar="USER", help="account the service runs as (default: you, or $SUDO_USER)")
    service.add_argument("--name", default="qie-hotfolder", help="unit name (default: qie-hotfolder)")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
