"""A booted systemd for tests: the Debian 12 root file system that ``scripts/nspawn-root`` builds,
started with ``systemd-nspawn --boot`` (systemd as PID 1 of the container), with the project,
its virtual environment and the Python that environment was made from bound in read-only, and
a folder of the test bound read-write at ``/srv/qie``. Commands run inside with ``nsenter``
(the container is not registered with machined, so ``machinectl`` cannot reach it).

Nothing is written into the root file system: it is booted with ``--volatile=overlay``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from tests.daemon import ROOT

ROOT_FS = Path(os.environ.get("QIE_NSPAWN_ROOT", "/var/cache/qie-nspawn-root"))
STAMP = ".qie-nspawn-root"
INSIDE = "/srv/qie"  # where the test's folder is bound in the container
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> Optional[str]:
    """Why no container can be booted here; None when one can."""
    if not sys.platform.startswith("linux"):
        return "systemd-nspawn runs on Linux only"
    if os.geteuid() != 0:
        return "booting a container with systemd-nspawn needs root"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    if not (ROOT_FS / STAMP).is_file():
        return (f"no root file system at {ROOT_FS} (QIE_NSPAWN_ROOT): scripts/nspawn-root builds it, "
                ".ci/run does so once")
    python = Path(os.path.realpath(sys.executable))
    if not _bound_from_host(python) and not (ROOT_FS / python.relative_to("/")).exists():
        return f"the virtual environment's Python {python} is part of this system and not in the container"
    return None


def _bound_from_host(path: Path) -> bool:
    return any(path == Path(p) or Path(p) in path.parents for p in host_paths())


def host_paths() -> list[str]:
    """What is bound read-only from this machine: the project, its virtual environment, and the
    Python installation that environment was made from (unless it is the system's /usr)."""
    paths = [str(ROOT), sys.prefix, sys.base_prefix]
    paths = [p for p in paths if not (Path(p) == Path("/usr") or Path("/usr") in Path(p).parents)]
    unique: list[str] = []
    for path in sorted(set(paths), key=len):
        if not any(path == u or path.startswith(u.rstrip("/") + "/") for u in unique):
            unique.append(path)
    return unique


class CannotBoot(RuntimeError):
    """systemd-nspawn exited before the container's systemd started: it cannot run here (an
    unprivileged container, no cgroup access, ...); the message is its log."""


class Container:
    """One booted container; ``run`` executes a command inside it (as root, or as ``user``)."""

    def __init__(self, folder: Path):
        self.folder = folder  # bound read-write at INSIDE
        self.log_path = folder.parent / f"{folder.name}-nspawn.log"
        self.process: Optional[subprocess.Popen] = None
        self.leader: Optional[int] = None  # PID 1 of the container, as this machine numbers it

    def host(self, inside: str) -> Path:
        """This machine's path of a path under INSIDE."""
        return self.folder / Path(inside).relative_to(INSIDE)

    def boot(self, timeout: float = 120) -> None:
        binds = [f"--bind-ro={path}" for path in host_paths()] + [f"--bind={self.folder}:{INSIDE}"]
        command = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--private-users=no",
                   f"--directory={ROOT_FS}", "--volatile=overlay", f"--machine=qie-test-{os.getpid()}",
                   "--console=passive", "--link-journal=no", "--resolv-conf=off", "--timezone=off",
                   *binds, "--boot"]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.process.poll() is not None:
                raise CannotBoot(f"systemd-nspawn exited ({self.process.returncode}): {self.log().strip()}")
            self.leader = self._find_leader()
            if time.monotonic() > deadline:
                raise AssertionError(f"the container did not start:\n{self.log()}")
            time.sleep(0.05)
        while True:  # until the system has booted (running, or degraded: some unit of it failed)
            state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the container did not finish booting ({state}):\n{self.log()}")
            time.sleep(0.2)

    def _find_leader(self) -> Optional[int]:
        """The container's systemd: the descendant of systemd-nspawn named systemd."""
        pending = [self.process.pid]
        while pending:
            pid = pending.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                try:
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return child
                except OSError:
                    continue
                pending.append(child)
        return None

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited ({self.process.returncode}):\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""

    def run(self, *argv: str, user: Optional[str] = None, env: Optional[dict[str, str]] = None,
            cwd: Optional[str] = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``argv`` in the container with a clean environment (``PATH`` and ``env``)."""
        self._check_alive()
        variables = {"PATH": PATH, "LANG": "C.UTF-8", **(env or {})}
        inner = ["env", "-i", *([f"--chdir={cwd}"] if cwd else []), *(f"{k}={v}" for k, v in variables.items()), *argv]
        if user is not None:
            inner = ["runuser", "-u", user, "--", *inner]
        result = subprocess.run(["nsenter", f"--target={self.leader}", "--all", "--", *inner],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def python(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        """``run.py ARGS`` with the project's Python, inside."""
        return self.run(sys.executable, str(ROOT / "run.py"), *args, **kwargs)

    def show(self, unit: str, *properties: str, manager: tuple[str, ...] = ()) -> dict[str, str]:
        result = self.run("systemctl", *manager, "show", unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)

    def journal(self, *match: str) -> list[dict[str, Any]]:
        """Journal entries (``journalctl -o json``) of this boot matching ``match``, with every
        message sent so far (journald reads its sockets on its own time: ``--sync`` waits)."""
        self.run("journalctl", "--sync")
        result = self.run("journalctl", "--boot", "--no-pager", "--output=json", "--all", *match)
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 120, what: str = "a condition",
                 unit: Optional[str] = None) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        detail = ""
        if unit is not None:
            detail = self.run("journalctl", "--boot", "--no-pager", "-o", "short-monotonic", "-n", "60", "-p", "info", "-u", unit,
                              check=False).stdout
        raise AssertionError(f"timed out waiting for {what}\n{detail}")

    def shutdown(self, timeout: float = 60) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if self.leader is not None:
            self.run("systemctl", "poweroff", "--no-block", check=False, timeout=30)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGKILL)  # systemd-nspawn, which we started
            self.process.wait(timeout=30)


def notifications(entries: list[dict[str, Any]]) -> list[str]:
    """The sd_notify messages the service manager received, in order, as it logs them at debug
    level: ``unit: Got notification message from PID N (READY=1, STATUS=...)``."""
    found = []
    for entry in entries:
        message = entry.get("MESSAGE")
        if isinstance(message, str) and "Got notification message from PID" in message:
            found.append(message.split(" (", 1)[1].rsplit(")", 1)[0])
    return found
