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
paths); ``run.py install-service`` writes it with this machine's paths, the groups it has and
the network its settings need, and ``check_unit`` (also run by ``doctor``) says what would stop
an installed unit from starting.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import shlex
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from processor.exits import EXIT_CONFIGURATION, EXIT_DATABASE, EXIT_RESTART

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


# Exit statuses ------------------------------------------------------------------------------

RESTART_PREVENT_EXIT_STATUS: dict[int, str] = {
    EXIT_CONFIGURATION: "the configuration cannot work",
    EXIT_DATABASE: "the database is damaged, or of a schema this version does not use",
}
"""The daemon's exit statuses after which a restart cannot help, and why: the unit's
``RestartPreventExitStatus=``. A new one is added here and nowhere else."""

RESTART_EXIT_STATUS = EXIT_RESTART
"""After a SIGHUP (``systemctl reload``) the daemon stops at a checkpoint and exits with this, to
be started again with the configuration as it is then: a success that is restarted."""


# What the machine has -----------------------------------------------------------------------

GPU_GROUPS = ("render", "video")
"""Groups that grant GPU access on the usual distributions (AMD's /dev/kfd and the render nodes)."""

GPU_DEVICES = ("nvidia*", "nvidia-caps/*", "kfd", "dri/renderD*", "dri/card*", "accel/*")
"""GPU device nodes under /dev (NVIDIA, AMD, DRM render nodes, compute accelerators)."""

HOME_DIRECTORIES = ("/home", "/root", "/run/user")
"""What ``ProtectHome=`` hides."""

TMP_DIRECTORIES = ("/tmp", "/var/tmp")
"""What ``PrivateTmp=`` replaces with empty folders of the service's own."""

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


def gpu_device_groups(dev: Path = Path("/dev")) -> list[str]:
    """The groups that own this machine's GPU device nodes where the group is what grants access
    (a node everyone may read and write needs none; root's group is no help to a service user)."""
    names: list[str] = []
    for pattern in GPU_DEVICES:
        for node in sorted(dev.glob(pattern)):
            try:
                info = node.stat()
            except OSError:
                continue
            if not stat.S_ISCHR(info.st_mode) or info.st_gid == 0 or info.st_mode & 0o006 == 0o006:
                continue
            try:
                name = grp.getgrgid(info.st_gid).gr_name
            except KeyError:
                continue
            if name not in names:
                names.append(name)
    return names


def service_groups(dev: Path = Path("/dev")) -> list[str]:
    """``SupplementaryGroups=`` for a unit on this machine: of the usual GPU groups those that
    exist here, and the groups of the GPU device nodes it has. Never a group it lacks: systemd
    refuses to start a unit naming one (status=216/GROUP)."""
    return existing_groups(list(dict.fromkeys([*GPU_GROUPS, *gpu_device_groups(dev)])))


def network_uses(settings: Mapping[str, Any]) -> list[str]:
    """The settings that need the network: a database server (``database_url`` other than
    SQLite), the web server (``http_listen`` other than ``off``), notification URLs, and
    ``notify_job_urls`` (a preset or job file may then name a URL to notify). Empty: the unit
    cuts the service off the network."""
    uses = []
    database = settings.get("database_url")
    if database and str(database).split(":", 1)[0].split("+", 1)[0] not in ("sqlite", "file"):
        uses.append("database_url")
    if settings.get("http_listen", "off") != "off":
        uses.append("http_listen")
    uses += [name for name in ("notify_urls", "notify_webhook_url", "notify_job_urls") if settings.get(name)]
    return uses


def installed_version(run: Callable[..., Any] = subprocess.run) -> Optional[int]:
    """The version of systemd on this machine (``systemctl --version``), None when unknown."""
    try:
        result = run(["systemctl", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"systemd (\d+)", result.stdout or "")
    return int(match.group(1)) if match else None


def within(path: str, directories: tuple[str, ...]) -> bool:
    """Whether ``path`` is one of ``directories`` or inside one."""
    return any(Path(path) == Path(top) or Path(top) in Path(path).parents for top in directories)


def outermost(paths: list[str]) -> list[str]:
    """``paths`` without repeats and without those inside another one, shortest first."""
    unique: list[Path] = []
    for path in sorted({Path(p) for p in paths}, key=lambda p: (len(p.parts), str(p))):
        if not any(path == u or u in path.parents for u in unique):
            unique.append(path)
    return [str(p) for p in unique]


# The unit file ------------------------------------------------------------------------------

@dataclass
class UnitOptions:
    """What the unit file says; ``example()`` gives the repository's copy."""

    python: str
    run_py: str
    working_directory: str
    config_file: Optional[str]
    writable: list[str]  # folders the daemon writes (inbox, outbox, failed, archive, work, database)
    readable: list[str] = field(default_factory=list)  # what it reads: Python, the code, models (for ProtectHome=)
    user: Optional[str] = None
    groups: list[str] = field(default_factory=list)
    user_unit: bool = False  # a ``systemctl --user`` unit: no User=, no namespace sandboxing
    network: list[str] = field(default_factory=list)  # what needs the network (``network_uses``); empty: cut off
    systemd_version: Optional[int] = None  # of the machine the unit is for; None: a current one
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
                   readable=[base], user="qie", network=["http_listen", "notify_job_urls"],  # the defaults
                   comment="An example with paths under /srv/qie-hotfolder: `python run.py install-service` writes\n"
                           "# one with this machine's paths, groups and network needs. See docs/operations.md.\n"
                           "# (Generated: a test checks it matches processor/systemd.py.)")


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
        lines += _device_lines(options.groups)
    lines += [
        "",
        "# Restart after a crash or a watchdog timeout; not after an exit status that says a restart",
        "# cannot help:",
        *(f"#   {status}: {why}" for status, why in RESTART_PREVENT_EXIT_STATUS.items()),
        "Restart=on-failure",
        "RestartSec=10",
        f"RestartPreventExitStatus={' '.join(str(status) for status in RESTART_PREVENT_EXIT_STATUS)}",
        f"# systemctl reload: SIGHUP; the daemon stops at a checkpoint and exits {RESTART_EXIT_STATUS}, to be started",
        "# again (after RestartSec) with the configuration as it is then.",
        f"ExecReload={_quote(options.python, command=True)} -c "
        '"import os, sys; os.kill(int(sys.argv[1]), 1)" $MAINPID',
        f"SuccessExitStatus={RESTART_EXIT_STATUS}",
        f"RestartForceExitStatus={RESTART_EXIT_STATUS}",
        "# A model load or a long step reports no progress: the daemon asks for more time itself",
        "# (EXTEND_TIMEOUT_USEC, setting model_load_timeout). 0 turns the watchdog off.",
        f"WatchdogSec={_seconds(options.watchdog_seconds)}",
        "# SIGTERM: the running job stops at its next step, is checkpointed and queued again;",
        "# after TimeoutStopSec (extended while the daemon drains) the rest is killed.",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={_seconds(options.stop_timeout)}",
        "",
    ]
    lines += _user_hardening(options) if options.user_unit else _system_hardening(options)
    lines += [
        "",
        "[Install]",
        f"WantedBy={'default.target' if options.user_unit else 'multi-user.target'}",
    ]
    return "\n".join(lines) + "\n"


def _device_lines(groups: list[str]) -> list[str]:
    lines = [
        "# GPU access: NVIDIA's /dev/nvidia* are usually world-accessible; AMD's /dev/kfd and",
        "# /dev/dri/renderD* belong to the render or video group. Only groups this machine has are",
        "# named: a missing one stops the unit (status=216/GROUP). No PrivateDevices= or DevicePolicy=",
        "# (either hides the GPU); to allow the GPU and nothing else, see docs/operations.md.",
    ]
    if groups:
        lines.append(f"SupplementaryGroups={' '.join(groups)}")
    else:
        lines.append(f"# SupplementaryGroups={' '.join(GPU_GROUPS)}  (where they exist; install-service checks)")
    return lines


_SECCOMP_LINES = [
    "NoNewPrivileges=yes", "RestrictNamespaces=yes", "RestrictSUIDSGID=yes", "RestrictRealtime=yes",
    "LockPersonality=yes",
    "# System calls: those of a system service (the daemon was run under this filter); any other",
    "# kills the process. Privileged ones fail as they do for an unprivileged process (SQLite run",
    "# as root changes the owner of its journal; it carries on when it may not).",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged:EPERM",
]


def _network_lines(options: UnitOptions) -> list[str]:
    if options.network:
        return [f"# The network is used ({', '.join(options.network)}): internet and local sockets only.",
                "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"]
    lines = ["# Nothing configured uses the network (a database server, webhooks, a web server), so the",
             "# service has none. Configure one, then run install-service again."]
    if not options.user_unit:
        lines += ["PrivateNetwork=yes", "IPAddressDeny=any"]
    return lines + ["RestrictAddressFamilies=AF_UNIX"]


def _system_hardening(options: UnitOptions) -> list[str]:
    lines = [
        "# Hardening, each line explained in docs/operations.md. Nothing here stops torch, CUDA or",
        "# Triton: no MemoryDenyWriteExecute= (their JIT compilers), no PrivateDevices= (the GPU).",
        *_file_system_lines(options),
        "PrivateTmp=yes",
        "PrivateMounts=yes",
        "ProtectProc=invisible",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
    ]
    if options.systemd_version is None or options.systemd_version >= 252:
        lines.append("ProtectClock=yes")  # before 252 it implied a device allow list that hid the GPU
    lines += [
        "ProtectHostname=yes",
        "CapabilityBoundingSet=",
        "RemoveIPC=yes",
        *_SECCOMP_LINES,
        *_network_lines(options),
        "# Results are readable by everyone: other accounts collect the outbox.",
        "UMask=0022",
        "# Caches of torch, Hugging Face and Triton, writable despite ProtectSystem=strict.",
        "CacheDirectory=qie-hotfolder",
        "Environment=XDG_CACHE_HOME=%C/qie-hotfolder",
        "Environment=TRITON_CACHE_DIR=%C/qie-hotfolder/triton",
    ]
    return lines


def _file_system_lines(options: UnitOptions) -> list[str]:
    """Read-only but for the folders the daemon writes; home directories hidden and /tmp private,
    or (when the service needs something in one: a pyenv Python in /root, a checkout in /tmp)
    empty but for what it needs, bound in."""
    writable = outermost(options.writable)
    readable = [path for path in outermost([options.python, options.run_py, options.working_directory,
                                            *([options.config_file] if options.config_file else []),
                                            *options.readable])
                if not within(path, tuple(writable))]
    hidden = HOME_DIRECTORIES + TMP_DIRECTORIES
    lines = ["# The file system is read-only but for the folders the daemon writes.",
             "ProtectSystem=strict",
             *(f"ReadWritePaths={_quote(path)}" for path in writable if not within(path, hidden)),
             "ProtectHome=tmpfs" if any(within(path, HOME_DIRECTORIES) for path in [*writable, *readable])
             else "ProtectHome=yes"]
    if not any(within(path, hidden) for path in [*writable, *readable]):
        return lines
    return lines + [
        "# Home directories are empty, and /tmp the service's own, but for what it needs from them.",
        *(f"BindReadOnlyPaths={_quote(path)}" for path in readable if within(path, hidden)),
        *(f"BindPaths={_quote(path)}" for path in writable if within(path, hidden)),
    ]


def _user_hardening(options: UnitOptions) -> list[str]:
    return [
        "# Hardening a user manager can apply: system call filters only. Namespace options",
        "# (ProtectSystem=, PrivateTmp=, PrivateNetwork=, ...) would need unprivileged user",
        "# namespaces; see docs/operations.md.",
        *_SECCOMP_LINES,
        *_network_lines(options),
        "UMask=0022",
        "Environment=XDG_CACHE_HOME=%C/qie-hotfolder",
        "Environment=TRITON_CACHE_DIR=%C/qie-hotfolder/triton",
    ]


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


def writable_paths(folders: dict[str, Path], state: Optional[Path]) -> list[str]:
    """The folders the daemon writes, each once, parents before children dropped when covered."""
    paths = [str(p) for p in folders.values()]
    if state is not None:
        paths.append(str(state.parent))  # SQLite writes its -wal and -shm files beside the database
    return outermost(paths)


def readable_paths(settings: Any, code: Path) -> list[str]:
    """What the service reads besides its folders: the virtual environment and the Python it was
    made from, the code, and the model folders the settings name."""
    paths = [sys.prefix, sys.base_prefix, str(Path(os.path.realpath(sys.executable)).parent.parent), str(code)]
    for value in (settings.model_path, settings.lora_dir, settings.comfyui_path, *settings.comfyui_extra_model_paths):
        if value is not None:
            paths.append(str(Path(value).resolve()))
    return outermost(paths)


# Checking a unit ----------------------------------------------------------------------------

def installed_units(name: str = "qie-hotfolder") -> list[Path]:
    """Where ``install-service`` puts a system unit and a user unit of this name."""
    return [Path("/etc/systemd/system") / f"{name}.service",
            Path.home() / ".config" / "systemd" / "user" / f"{name}.service"]


def unit_values(text: str, section: str = "Service") -> dict[str, list[str]]:
    """``key -> [value, ...]`` of one section of a unit file (a key may be given several times)."""
    values: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if sep and current == section:
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def check_unit(text: str, network: Optional[list[str]] = None, default_user: str = "root") -> list[str]:
    """What would stop this unit from starting, or its daemon from working: a user or group this
    machine lacks, a missing program, folder or configuration file, a folder the service's
    account may not write (with ``CapabilityBoundingSet=`` root too obeys the mode bits), and a
    unit cut off the network that ``network`` (``network_uses`` of the settings) needs."""
    values = unit_values(text)
    problems: list[str] = []
    user = (values.get("User") or [default_user])[-1]
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        account = None
        problems.append(f"user {user} does not exist (the unit fails with status=217/USER): create it, e.g. "
                        f"useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {user}")
    groups = [name for value in values.get("SupplementaryGroups", []) for name in value.split()]
    for name in groups:
        if not existing_groups([name]):
            problems.append(f"group {name} does not exist (the unit fails with status=216/GROUP): "
                            "run install-service again")
    command = shlex.split((values.get("ExecStart") or [""])[-1].lstrip("-@+!:"))
    needed: list[tuple[str, int, str]] = []  # path, access, what the unit fails with when it is missing
    if command:
        needed.append((command[0], os.X_OK, "status=203/EXEC"))
        needed += [(part, os.R_OK, "the daemon cannot start") for part in command[1:2] if part.endswith(".py")]
        if "--config" in command[:-1]:
            needed.append((command[command.index("--config") + 1], os.R_OK, "the daemon exits with status 2"))
    for directory in values.get("WorkingDirectory", []):
        if not directory.startswith("-"):
            needed.append((directory, os.X_OK, "status=200/CHDIR"))
    for key in ("ReadWritePaths", "BindPaths"):
        needed += [(path, os.W_OK | os.X_OK, "status=226/NAMESPACE")
                   for value in values.get(key, []) for path in shlex.split(value) if not path.startswith("-")]
    needed += [(path, os.R_OK, "status=226/NAMESPACE")
               for value in values.get("BindReadOnlyPaths", []) for path in shlex.split(value) if not path.startswith("-")]
    # The service reaches what is bound into its empty home directories or its own /tmp through
    # folders systemd makes, whatever the modes of the real ones (/root is 700).
    bound = [path for key in ("BindPaths", "BindReadOnlyPaths") for value in values.get(key, [])
             for path in shlex.split(value) if within(path, HOME_DIRECTORIES + TMP_DIRECTORIES)]
    for path, mode, failure in needed:
        path = path.replace("%%", "%")
        if not os.path.exists(path):
            problems.append(f"{path} does not exist ({failure})")
        elif account is not None and not can_access(Path(path), account, groups, mode, bound):
            want = "write" if mode & os.W_OK else "run" if mode == os.X_OK and not os.path.isdir(path) else "read"
            problems.append(f"{user} may not {want} {path} ({_owner_and_mode(Path(path))}): change its owner or mode")
    families = " ".join(values.get("RestrictAddressFamilies", []))
    cut_off = (values.get("PrivateNetwork") or ["no"])[-1] in ("yes", "true", "1") or \
        (families and "AF_INET" not in families)
    if network and cut_off:
        problems.append(f"the unit cuts the service off the network, which {', '.join(network)} needs: "
                        "run install-service again")
    return problems


def can_access(path: Path, account: pwd.struct_passwd, groups: list[str], mode: int,
               bound: list[str] = ()) -> bool:
    """Whether the account (with these supplementary groups) may ``mode`` (``os.R_OK`` ...) the
    path by its mode bits and those of the folders leading to it (ACLs are not read); folders
    above a path in ``bound`` are not the real ones and are not looked at."""
    gids = set(os.getgrouplist(account.pw_name, account.pw_gid))
    gids.update(grp.getgrnam(name).gr_gid for name in existing_groups(groups))

    def allowed(info: os.stat_result, want: int) -> bool:
        if info.st_uid == account.pw_uid:
            bits = (info.st_mode >> 6) & 7
        elif info.st_gid in gids:
            bits = (info.st_mode >> 3) & 7
        else:
            bits = info.st_mode & 7
        return bits & want == want

    try:
        for candidate in dict.fromkeys([path.absolute(), path.resolve()]):
            roots = [Path(root) for root in bound if Path(root) == candidate or Path(root) in candidate.parents]
            if not all(allowed(os.stat(parent), os.X_OK) for parent in candidate.parents
                       if not any(parent in root.parents for root in roots)):
                return False
            if not allowed(os.stat(candidate), mode):
                return False
    except OSError:
        return False
    return True


def _owner_and_mode(path: Path) -> str:
    info = path.stat()
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    return f"owner {owner}, mode {stat.S_IMODE(info.st_mode):o}"
