"""Running under systemd: readiness, status and watchdog notifications, and the unit file.

The daemon talks to systemd through the ``sd_notify`` protocol: one unix datagram per message,
sent to the socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). Without that variable every call here does nothing, so the same daemon runs in a
terminal, under cron or under systemd.

What the daemon sends, and when:

- ``READY=1`` once start-up is done (folders, lock, database, recovery, watcher);
- ``STATUS=...`` with what it is doing: the job, its stage and sampling step, or idle;
- ``WATCHDOG=1`` from its main loop at half the interval systemd asks for (``$WATCHDOG_USEC``),
  and from every progress report, so a loop stuck anywhere is restarted;
- ``EXTEND_TIMEOUT_USEC=...`` before a model load (which can take minutes and reports no
  progress), together with a temporarily longer ``WATCHDOG_USEC`` that the next ordinary ping
  restores; and while it drains after SIGTERM, so the stop timeout covers the step in hand;
- ``STOPPING=1`` when a stop was asked for.

``unit_text`` renders the unit file (``deploy/qie-hotfolder.service`` is one, with example
paths); ``run.py install-service`` writes it with this machine's paths.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages; a no-op when systemd did not give a socket."""

    def __init__(self, address: Optional[str], watchdog_usec: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.address = _socket_address(address) if address else None
        self.watchdog_usec = watchdog_usec if self.address is not None else None
        self._clock = clock
        self._socket: Optional[socket.socket] = None
        self._lock = threading.Lock()
        self._last_ping = float("-inf")
        self._status: Optional[str] = None
        self._watchdog_raised = False
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Optional[dict] = None) -> "Notifier":
        """The notifier systemd set up for this process (``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC``)."""
        env = os.environ if environ is None else environ
        watchdog = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> Optional[float]:
        """Seconds between two pings: half of what systemd allows; None without a watchdog."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one message. False when it could not be sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.sendto(message, self.address)
            except OSError as exc:
                if not self._failed:  # say it once; systemd may simply be gone (e.g. during shutdown)
                    log.warning("cannot notify systemd at %s: %s", self.address, exc)
                    self._failed = True
                return False
        self._failed = False
        return True

    # The messages --------------------------------------------------------------------------

    def ready(self, status: str) -> None:
        self._status = status
        self.send("READY=1", f"STATUS={_one_line(status)}", f"MAINPID={os.getpid()}")
        self._last_ping = self._clock()

    def status(self, text: str) -> None:
        """``STATUS=`` when it changed; pings the watchdog as well (progress means alive)."""
        fields = []
        if text != self._status:
            self._status = text
            fields.append(f"STATUS={_one_line(text)}")
        fields += self._ping_fields()
        if fields:
            self.send(*fields)

    def watchdog(self, force: bool = False) -> None:
        """``WATCHDOG=1`` when half the watchdog interval has passed (or ``force``)."""
        due = self.watchdog_interval is not None and self._clock() - self._last_ping >= self.watchdog_interval
        if force or due or self._watchdog_raised:
            fields = self._ping_fields(force=True)
            if fields:
                self.send(*fields)

    def extend_timeout(self, seconds: float, why: str = "") -> None:
        """Ask for ``seconds`` more before systemd gives up on the current start, stop or
        watchdog interval: ``EXTEND_TIMEOUT_USEC`` and, with a watchdog, a longer
        ``WATCHDOG_USEC`` until the next ordinary ping."""
        usec = int(seconds * 1e6)
        fields = [f"EXTEND_TIMEOUT_USEC={usec}"]
        if why:
            fields.append(f"STATUS={_one_line(why)}")
            self._status = why
        if self.watchdog_usec:
            fields += ["WATCHDOG=1", f"WATCHDOG_USEC={max(usec, self.watchdog_usec)}"]
            self._watchdog_raised = True
            self._last_ping = self._clock()
        self.send(*fields)

    def stopping(self, status: str = "stopping") -> None:
        self._status = status
        self.send("STOPPING=1", f"STATUS={_one_line(status)}")

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _ping_fields(self, force: bool = False) -> list[str]:
        if self.watchdog_interval is None:
            return []
        now = self._clock()
        if not force and not self._watchdog_raised and now - self._last_ping < self.watchdog_interval / 2:
            return []  # pinged moments ago: progress every step need not mean a datagram every step
        self._last_ping = now
        fields = ["WATCHDOG=1"]
        if self._watchdog_raised:  # the long operation is over: back to the unit's interval
            fields.append(f"WATCHDOG_USEC={self.watchdog_usec}")
            self._watchdog_raised = False
        return fields

    def seconds_to_next_ping(self) -> Optional[float]:
        """How long the main loop may sleep before the next ping is due; None without a watchdog."""
        if self.watchdog_interval is None:
            return None
        return max(self.watchdog_interval - (self._clock() - self._last_ping), 0.0)


def _socket_address(address: str):
    """``@name`` is the abstract namespace (a leading NUL byte); anything else a path."""
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


# The unit file ------------------------------------------------------------------------------

@dataclass
class UnitOptions:
    """What the unit file says; ``example()`` gives the repository's copy."""

    python: str
    run_py: str
    working_directory: str
    config_file: Optional[str]
    writable: list[str]  # folders the daemon writes (inbox, outbox, failed, archive, work, database)
    readable_note: list[str] = field(default_factory=list)  # model folders, for the comment only
    user: Optional[str] = None
    groups: list[str] = field(default_factory=list)
    user_unit: bool = False  # a ``systemctl --user`` unit: no User=, no namespace sandboxing
    watchdog_seconds: float = 120
    stop_timeout: float = 120
    extra_args: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    comment: str = "Written by `python run.py install-service`; see docs/operations.md."

    @classmethod
    def example(cls) -> "UnitOptions":
        base = "/srv/qie-hotfolder"
        return cls(python=f"{base}/.venv/bin/python", run_py=f"{base}/run.py", working_directory=base,
                   config_file=f"{base}/qie-hotfolder.toml",
                   writable=[f"{base}/{name}" for name in ("inbox", "outbox", "failed", "archive", "work", "data")],
                   user="qie", groups=["video", "render"],
                   comment="An example with paths under /srv/qie-hotfolder: `python run.py install-service` writes\n"
                           "# one with this machine's paths. See docs/operations.md. (Generated: a test checks it\n"
                           "# matches processor/systemd.py.)")


def unit_text(options: UnitOptions) -> str:
    exec_start = [options.python, options.run_py, "serve"]
    if options.config_file:
        exec_start += ["--config", options.config_file]
    exec_start += options.extra_args
    lines = [
        "# qie-hotfolder as a systemd service.",
        f"# {options.comment}",
        "[Unit]",
        "Description=qie-hotfolder: Qwen-Image-Edit-2509 hot folder",
        f"Documentation={(Path(options.run_py).parent / 'docs' / 'operations.md').as_uri().replace('%', '%%')}",
        *([] if options.user_unit else [
            "After=network-online.target local-fs.target remote-fs.target",
            "Wants=network-online.target",
            "# An inbox on a network share: also wait for its mount, e.g.",
            "# RequiresMountsFor=/mnt/nas/inbox"]),
        "",
        "[Service]",
        "# READY=1 after start-up, STATUS= with the job, stage and step, WATCHDOG=1 from the loop.",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={' '.join(_quote(part, command=True) for part in exec_start)}",
        f"WorkingDirectory={options.working_directory.replace('%', '%%')}",
        "Environment=PYTHONUNBUFFERED=1",
        *(f"Environment={_quote(f'{key}={value}')}" for key, value in sorted(options.environment.items())),
    ]
    if not options.user_unit:
        if options.user:
            lines.append(f"User={options.user}")
        lines += [
            "# GPU access: NVIDIA's /dev/nvidia* are usually world-accessible; AMD's /dev/kfd and",
            "# /dev/dri/renderD* belong to the video or render group. Do not set PrivateDevices=",
            "# (it hides the GPU). To allow only the GPU devices, add:",
            "#   DevicePolicy=closed",
            "#   DeviceAllow=/dev/nvidiactl rw",
            "#   DeviceAllow=char-nvidia-frontend rw",
            "#   DeviceAllow=char-nvidia-uvm rw",
            "#   DeviceAllow=char-nvidia-caps rw",
            "# or, for AMD: DeviceAllow=/dev/kfd rw and DeviceAllow=char-drm rw",
        ]
        if options.groups:
            lines.append(f"SupplementaryGroups={' '.join(options.groups)}")
    lines += [
        "",
        "# Restart after a crash or a watchdog timeout; not after a configuration error (exit 2).",
        "Restart=on-failure",
        "RestartSec=10",
        "RestartPreventExitStatus=2",
        "# A model load or a long step reports no progress: the daemon asks for more time itself",
        "# (EXTEND_TIMEOUT_USEC, setting model_load_timeout). 0 turns the watchdog off.",
        f"WatchdogSec={_seconds(options.watchdog_seconds)}",
        "# SIGTERM: the running job stops at its next step, is checkpointed and queued again;",
        "# after TimeoutStopSec (extended while the daemon drains) the rest is killed.",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={_seconds(options.stop_timeout)}",
        "",
        "# Hardening: the file system is read-only but for the folders the daemon writes.",
        "NoNewPrivileges=yes",
    ]
    if options.user_unit:
        lines.append("# (ProtectSystem= and PrivateTmp= need a system unit; see docs/operations.md.)")
    else:
        lines += ["ProtectSystem=strict", "PrivateTmp=yes"]
        lines += [f"ReadWritePaths={_quote(path)}" for path in options.writable]
        lines += ["# Caches of torch, Hugging Face and Triton, writable despite ProtectSystem=strict.",
                  "CacheDirectory=qie-hotfolder"]
    lines += [
        "Environment=XDG_CACHE_HOME=%C/qie-hotfolder",
        "Environment=TRITON_CACHE_DIR=%C/qie-hotfolder/triton",
        "",
        "[Install]",
        f"WantedBy={'default.target' if options.user_unit else 'multi-user.target'}",
    ]
    return "\n".join(lines) + "\n"


def _quote(value: str, command: bool = False) -> str:
    """A word as systemd reads it: double-quoted when it holds spaces, quotes or backslashes;
    ``%`` (specifiers) doubled, and ``$`` (variables) too in a command line."""
    value = value.replace("%", "%%")
    if command:
        value = value.replace("$", "$$")
    if value and not any(c in value for c in " \t\"'\\;$"):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _seconds(value: float) -> str:
    return f"{value:g}s" if value else "0"


def existing_groups(names: list[str]) -> list[str]:
    """The groups of ``names`` that exist on this machine (a unit naming a missing one fails)."""
    found = []
    for name in names:
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        found.append(name)
    return found


def writable_paths(folders: dict[str, Path], state: Optional[Path]) -> list[str]:
    """The folders the daemon writes, each once, parents before children dropped when covered."""
    paths = [Path(p) for p in folders.values()]
    if state is not None:
        paths.append(state.parent)  # SQLite writes its -wal and -shm files beside the database
    unique: list[Path] = []
    for path in sorted(set(paths), key=lambda p: (len(p.parts), str(p))):
        if not any(path == u or u in path.parents for u in unique):
            unique.append(path)
    return [str(p) for p in unique]
