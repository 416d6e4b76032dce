"""The service under a real systemd: a minimal Debian 12 booted with systemd-nspawn
(``tests/nspawn.py``), in which ``install-service`` writes the unit and systemd runs the real
daemon with it, as a service user, as root, and under a user manager (``--user``).

One container is booted for the module; each scenario has a unit and folders of its own under
``/srv/qie/NAME``. Fixtures do the runs, tests assert on what they left. Where no container can
be booted (not root, no systemd-nspawn, no root file system: ``.ci/run`` builds one with
``scripts/nspawn-root``), everything here is skipped, naming the reason.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from processor.cli import EXIT_CONFIGURATION
from processor.systemd import RESTART_EXIT_STATUS, unit_values
from tests import nspawn
from tests.daemon import ROOT, Folders, tiny_job
from tests.nspawn import INSIDE, CannotBoot, Container, notifications

REASON = nspawn.unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no booted systemd here: {REASON}"),
              pytest.mark.xdist_group("nspawn")]  # one container, one worker (pytest --dist loadgroup)

JOB = tiny_job(seed=5, steps=6)
SAMPLING = "SELECT step FROM jobs WHERE stage = 'sample' AND step >= 2"  # held 2-3 s there by QIE_FAULTS


@pytest.fixture(scope="module")
def box(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("booted")
    folder.chmod(0o755)  # /srv/qie in the container; the services' accounts pass through it
    shutil.copytree(tiny_model, folder / "model")
    container = Container(folder)
    try:
        try:
            container.boot()
        except CannotBoot as exc:
            pytest.skip(f"no booted systemd here: {exc}")
        container.run("systemd-analyze", "log-level", "debug")  # PID 1 logs every sd_notify message it gets
        container.run("useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", "qie")
        yield container
    finally:
        container.shutdown()


class Service:
    """A unit that ``install-service`` wrote, inside the container, for folders of its own; a
    system unit run as ``account``, or (``user_unit``) a unit of ``account``'s user manager."""

    def __init__(self, box: Container, name: str, account: str = "qie", user_unit: bool = False, **env: str):
        self.box, self.account, self.user_unit = box, account, user_unit
        self.unit = f"qie-{name}"
        self.path = f"{INSIDE}/{name}"
        self.folders = Folders(box.host(self.path), box.host(f"{INSIDE}/model"))
        self.env = {key: value.replace(str(box.folder), INSIDE) for key, value in self.folders.env(**env).items()
                    if key.startswith("QIE_")}
        self.user_env: dict[str, str] = {}
        if user_unit:
            uid = box.run("id", "-u", account).stdout.strip()
            self.user_env = {"HOME": f"/home/{account}", "XDG_RUNTIME_DIR": f"/run/user/{uid}"}

    def install(self) -> str:
        """Write the unit with ``install-service`` (run as root, or as the account for a user
        unit); its text."""
        self.box.run("chown", "-R", f"{self.account}:", self.path)
        if self.user_unit:
            self.box.python("install-service", "--user", "--name", self.unit, user=self.account,
                            env={**self.env, **self.user_env}, cwd=self.path)
            target = f"{self.user_env['HOME']}/.config/systemd/user/{self.unit}.service"
        else:
            target = f"/etc/systemd/system/{self.unit}.service"
            self.box.python("install-service", "--run-as", self.account, "--output", target, env=self.env, cwd=self.path)
        self.ctl("daemon-reload")
        return self.box.run("cat", target).stdout

    def ctl(self, *args: str, check: bool = True):
        if self.user_unit:
            return self.box.run("systemctl", "--user", *args, user=self.account, env=self.user_env, check=check)
        return self.box.run("systemctl", *args, check=check)

    def show(self, *properties: str) -> dict[str, str]:
        result = self.ctl("show", self.unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)

    def journal(self) -> list[dict[str, Any]]:
        """What the manager logged about the unit and what the daemon logged."""
        if self.user_unit:
            # A process that exits at once may be gone before journald reads its unit from /proc;
            # its main PID (from the sender's credentials) still names its messages.
            pid = self.show("ExecMainPID").get("ExecMainPID", "0")
            by_pid = ["+", f"_PID={pid}"] if pid not in ("", "0") else []
            return self.box.journal(f"_SYSTEMD_USER_UNIT={self.unit}.service", "+", f"USER_UNIT={self.unit}.service",
                                    *by_pid)
        return self.box.journal(f"--unit={self.unit}")

    def main_pid(self) -> str:
        return self.show("MainPID")["MainPID"]

    def wait_for(self, predicate, what: str, timeout: float = 300):
        try:
            return self.box.wait_for(predicate, timeout=timeout, what=f"{what} ({self.unit})",
                                     unit=None if self.user_unit else self.unit)
        except AssertionError as exc:
            if not self.user_unit:
                raise
            raise AssertionError(f"{exc}\n" + "\n".join(_messages(self.journal())[-40:])) from None

    def wait_for_output(self, name: str = "edit") -> bytes:
        """The published image, once the job is recorded as done too (the two happen apart)."""
        path = self.folders.outbox / f"{name}.png"
        self.wait_for(lambda: path.exists(), what=f"{path.name} in the outbox")
        if "QIE_DATABASE_URL" not in self.env:
            self.wait_for(lambda: self.folders.job_states().get(name) == "done", what=f"job {name} recorded as done")
        return path.read_bytes()


def _messages(entries: list[dict[str, Any]]) -> list[str]:
    return [entry["MESSAGE"] for entry in entries if isinstance(entry.get("MESSAGE"), str)]


@dataclass
class Run:
    """What a scenario left behind, for the tests to look at."""

    service: Service
    unit_text: str = ""
    start: Optional[int] = None
    stop: Optional[int] = None
    output: bytes = b""
    after: dict[str, str] = field(default_factory=dict)
    journal: list[dict[str, Any]] = field(default_factory=list)

    @property
    def notifications(self) -> list[str]:
        return notifications(self.journal)

    @property
    def messages(self) -> list[str]:
        return _messages(self.journal)


def _publish_and_stop(service: Service) -> Run:
    """A job dropped before the start, run to its output; then ``systemctl stop``."""
    run = Run(service)
    service.folders.drop("edit", JOB)
    run.unit_text = service.install()
    run.start = service.ctl("start", service.unit, check=False).returncode
    run.output = service.wait_for_output()
    service.wait_for(lambda: service.show("StatusText")["StatusText"].startswith("idle"), what="idle")
    run.stop = service.ctl("stop", service.unit, check=False).returncode
    run.after = service.show("Result", "ExecMainCode", "ExecMainStatus", "NRestarts", "DevicePolicy", "DeviceAllow",
                             "PrivateDevices", "SupplementaryGroups", "User", "SystemCallFilter")
    run.journal = service.journal()
    return run


@pytest.fixture(scope="module")
def alice(box) -> str:
    """An account whose user manager runs (as ``loginctl enable-linger alice`` has it at boot)."""
    box.run("useradd", "--create-home", "--user-group", "--shell", "/bin/sh", "alice")
    uid = box.run("id", "-u", "alice").stdout.strip()
    box.run("systemctl", "start", f"user@{uid}.service")
    # alice runs the project's Python, which may live under /root (pyenv): let her reach it.
    box.run("chmod", "o+x", "/root")
    box.run("systemctl", "--user", "log-level", "debug", user="alice",  # it logs every sd_notify message
            env={"XDG_RUNTIME_DIR": f"/run/user/{uid}"})
    return "alice"


@pytest.fixture(scope="module")
def make_service(box, request):
    """``make(name, manager, **env)``: a Service of the system manager (as qie, or ``account``)
    or of alice's user manager."""
    def make(name: str, manager: str = "system", account: str = "qie", **env: str) -> Service:
        if manager == "user":
            return Service(box, f"{name}-user", account=request.getfixturevalue("alice"), user_unit=True, **env)
        return Service(box, name, account=account, **env)
    return make


@pytest.fixture(scope="module")
def main_run(make_service) -> Run:
    """The unit for a service account (qie), one job published."""
    return _publish_and_stop(make_service("main"))


@pytest.fixture(scope="module")
def user_run(make_service) -> Run:
    """``install-service --user`` under alice's user manager, one job published."""
    return _publish_and_stop(make_service("main", "user"))


@pytest.fixture(scope="module", params=["system", "user"])
def published(request) -> Run:
    """The run of one job, by the system manager (as qie) and by alice's user manager."""
    return request.getfixturevalue("main_run" if request.param == "system" else "user_run")


def _stop_while_sampling(service: Service) -> Run:
    """``systemctl stop`` while the job samples (held after step 2 by QIE_FAULTS)."""
    run = Run(service)
    service.folders.drop("edit", JOB)
    run.unit_text = service.install()
    run.start = service.ctl("start", service.unit, check=False).returncode
    service.wait_for(lambda: service.folders.db_rows(SAMPLING), what="sampling step 2")
    run.stop = service.ctl("stop", service.unit, check=False).returncode
    run.after = service.show("Result", "ExecMainCode", "ExecMainStatus", "NRestarts", "User", "SystemCallFilter")
    run.journal = service.journal()
    return run


@pytest.fixture(scope="module")
def root_run(make_service) -> Run:
    """As root: ``systemctl stop`` while the job samples."""
    return _stop_while_sampling(make_service("stop", account="root", QIE_FAULTS="stage.sample.step2=pause:3"))


# One job, start to stop ----------------------------------------------------------------------

def test_the_written_unit_names_only_groups_this_system_has_and_starts(box, main_run):
    # Preconditions: this Debian has a video group but no render group (no udev installed).
    assert box.run("getent", "group", "render", check=False).returncode == 2
    assert box.run("getent", "group", "video", check=False).returncode == 0
    groups = [line for line in main_run.unit_text.splitlines() if line.startswith("SupplementaryGroups=")]
    assert groups == ["SupplementaryGroups=video"]
    assert main_run.start == 0
    assert main_run.after["User"] == "qie" and main_run.after["SupplementaryGroups"] == "video"


def test_ready_comes_before_the_first_job_and_status_names_the_job_stage_and_step(published):
    messages = published.notifications
    ready = next(i for i, message in enumerate(messages) if "READY=1" in message)
    first_job = next(i for i, message in enumerate(messages) if "STATUS=job 1 (edit)" in message)
    assert ready < first_job  # the job was waiting in the inbox before the start
    assert any("STATUS=job 1 (edit): sample step 3/6" in message for message in messages[first_job:])
    assert any("STATUS=job 1 (edit): decode" in message for message in messages[first_job:])
    assert any(message.startswith("STATUS=idle") for message in messages[first_job:])


def test_the_job_is_published_and_systemctl_stop_exits_0(published, main_run):
    assert published.start == 0
    assert published.output.startswith(b"\x89PNG") and published.output == main_run.output
    assert (published.service.folders.outbox / "edit.json").exists()
    assert published.service.folders.job_states() == {"edit": "done"}
    assert published.stop == 0
    assert (published.after["Result"], published.after["ExecMainStatus"], published.after["NRestarts"]) == \
        ("success", "0", "0")


def test_the_journal_carries_the_job_and_the_stage_as_fields(box, published):
    service = published.service
    entries = box.journal(f"_SYSTEMD_{'USER_' if service.user_unit else ''}UNIT={service.unit}.service",
                          "QIE_JOB=1", "QIE_STAGE=sample")
    assert entries, "no journal entry with QIE_JOB=1 and QIE_STAGE=sample"
    step = next(entry for entry in entries if "sample step 2/6" in entry["MESSAGE"])
    assert step["PRIORITY"] == "6" and step["SYSLOG_IDENTIFIER"] == "qie-hotfolder"
    assert step["MESSAGE"].startswith("processor.daemon: [job 1 sample] ")
    assert step["CODE_FILE"].endswith("processor/daemon.py") and step["QIE_LOGGER"] == "processor.daemon"
    assert step["_UID"] == box.run("id", "-u", service.account).stdout.strip()


def test_a_record_too_large_for_a_datagram_reaches_the_real_journal(box):
    big = "x" * 300_000  # beyond the 208 KiB a unix datagram may carry by default: sent as a memfd
    code = ("import logging; from processor.logs import configure; configure('INFO'); "
            f"logging.getLogger('qie.test.big-record').info('%s', {big[:1]!r} * {len(big)})")
    box.run("systemd-run", "--wait", "--quiet", "--unit=qie-big-record", f"--working-directory={ROOT}",
            sys.executable, "-c", code)
    # (Matched by its logger: journald may read the memfd after the process has gone, too late to
    # learn its unit.)
    entries = box.journal("QIE_LOGGER=qie.test.big-record")
    assert [entry["MESSAGE"] for entry in entries] == [f"qie.test.big-record: {big}"]
    assert entries[0]["_TRANSPORT"] == "journal" and entries[0]["SYSLOG_IDENTIFIER"] == "qie-hotfolder"


def test_the_gpu_devices_stay_reachable_under_the_hardened_unit(main_run):
    # As systemd resolves the unit: no device allow list (ProtectClock= adds none on 252) and
    # no private /dev, so /dev/nvidia*, /dev/kfd and /dev/dri/* are opened as without systemd.
    assert main_run.after["DevicePolicy"] == "auto"
    assert main_run.after.get("DeviceAllow", "") == ""
    assert main_run.after["PrivateDevices"] == "no"


def test_the_system_call_filter_holds_the_real_daemon_as_a_service_user_as_root_and_as_a_user(main_run, root_run,
                                                                                              user_run):
    # A call outside the filter kills the process with SIGSYS: each daemon ran its job through
    # (torch, SQLite, inotify, the journal). Root's SQLite changes the owner of its WAL file, a
    # privileged call that fails with EPERM here and that SQLite carries on from.
    for run in (main_run, root_run, user_run):
        assert "SystemCallFilter=~@privileged:EPERM" in run.unit_text.splitlines()
        assert run.after["SystemCallFilter"], run.after
        assert run.start == 0 and run.after["NRestarts"] == "0" and run.after["Result"] == "success"
        assert not [m for m in run.messages if "status=31/SYS" in m]
    assert (main_run.after["User"], root_run.after["User"]) == ("qie", "root")
    assert main_run.service.folders.job_states() == user_run.service.folders.job_states() == {"edit": "done"}
    # Root's daemon got as far as sampling (where it was stopped; a later test may finish the job).
    assert root_run.service.folders.db_rows("SELECT 1 FROM stage_runs WHERE stage = 'sample' AND error = 'interrupted'")


# Stopping and crashing -----------------------------------------------------------------------

@pytest.mark.parametrize("manager", ["system", "user"])
def test_systemctl_stop_while_sampling_exits_0_and_the_next_start_resumes_to_the_same_bytes(box, main_run, manager,
                                                                                              make_service, request):
    if manager == "system":
        run = request.getfixturevalue("root_run")
    else:
        run = _stop_while_sampling(make_service("stop", manager, QIE_FAULTS="stage.sample.step2=pause:3"))
    service = run.service
    # systemctl stop returned after a clean exit...
    assert run.start == 0 and run.stop == 0
    assert (run.after["Result"], run.after["ExecMainStatus"]) == ("success", "0")
    # ...which left the job queued, sampling interrupted after step 2, and step 2's latent on disk.
    assert service.folders.db_rows("SELECT state, crashes FROM jobs") == [("queued", 0)]
    assert ("sample", 0, None, "interrupted") in service.folders.stage_runs(1)
    partials = service.folders.db_rows("SELECT fingerprint, path FROM checkpoints WHERE fingerprint LIKE '%.step%'")
    assert [fingerprint.rsplit(".", 1)[1] for fingerprint, _ in partials] == ["step2"]
    assert box.host(partials[0][1]).is_file()

    assert service.ctl("start", service.unit, check=False).returncode == 0
    assert service.wait_for_output() == main_run.output
    assert service.folders.db_rows("SELECT resumed_from_step FROM stage_runs "
                                   "WHERE stage = 'sample' AND error IS NULL") == [(2,)]
    service.ctl("stop", service.unit)


@pytest.mark.parametrize("manager", ["system", "user"])
def test_a_daemon_frozen_by_sigstop_is_killed_by_the_watchdog_restarted_and_resumes_to_the_same_bytes(
        main_run, manager, make_service):
    # 15 s: well above the daemon's longest stretch without a ping on a busy machine (model
    # loads and the engine's start ask for more time), well above the 2 s held at step 2.
    service = make_service("watchdog", manager, QIE_WATCHDOG_SECONDS="15", QIE_FAULTS="stage.sample.step2=pause:2")
    service.folders.drop("edit", JOB)
    assert "WatchdogSec=15s" in service.install().splitlines()
    assert service.ctl("start", service.unit, check=False).returncode == 0
    service.wait_for(lambda: service.folders.db_rows(SAMPLING), what="sampling step 2")
    frozen = service.main_pid()
    service.ctl("kill", "--kill-whom=main", "--signal=SIGSTOP", service.unit)

    assert service.wait_for_output() == main_run.output
    after = service.show("NRestarts", "MainPID")
    assert after["NRestarts"] == "1" and after["MainPID"] != frozen
    messages = _messages(service.journal())
    assert any("Watchdog timeout" in m for m in messages), messages[-20:]
    assert any(f"Killing process {frozen}" in m and "SIGABRT" in m for m in messages)
    # The frozen run counted as a crash; the new one resumed sampling after step 2.
    assert service.folders.db_rows("SELECT state, crashes FROM jobs") == [("done", 1)]
    runs = service.folders.db_rows("SELECT resumed_from_step, finished_at IS NOT NULL FROM stage_runs "
                                   "WHERE stage = 'sample' ORDER BY id")
    assert runs[-1] == (2, 1), runs
    service.ctl("stop", service.unit)


@pytest.mark.parametrize("manager", ["system", "user"])
def test_a_configuration_error_exits_with_the_status_not_restarted_and_the_journal_says_why(box, manager,
                                                                                             make_service):
    service = make_service("config", manager)
    (service.folders.root / "qie-hotfolder.toml").write_text('log_level = "INFO"\n')
    unit = unit_values(service.install())
    assert str(EXIT_CONFIGURATION) in unit["RestartPreventExitStatus"][0].split()
    (service.folders.root / "qie-hotfolder.toml").write_text('device = "tpu"\n')  # broken after installing

    assert service.ctl("start", service.unit, check=False).returncode != 0
    after = service.show("ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
    # Failed for good: no restart is pending (that would be SubState=auto-restart).
    assert after == {"ActiveState": "failed", "SubState": "failed", "Result": "exit-code",
                     "ExecMainStatus": str(EXIT_CONFIGURATION), "NRestarts": "0"}
    messages = _messages(service.journal())
    said = next(i for i, m in enumerate(messages) if m.startswith("configuration error: invalid configuration"))
    assert str(service.folders.root / "qie-hotfolder.toml").replace(str(box.folder), INSIDE) in messages[said]
    said_why = " ".join(messages[said:said + 3])  # one line, or the field and the reason on lines of their own
    assert "device" in said_why and "input_value='tpu'" in said_why
    assert any(f"status={EXIT_CONFIGURATION}/INVALIDARGUMENT" in m for m in messages[said:])
    assert "Service will not restart (prevented by exit status)" in " ".join(messages[said:])


def test_systemctl_reload_restarts_the_daemon_with_the_configuration_as_it_is_then(make_service):
    service = make_service("reload")
    config = service.folders.root / "qie-hotfolder.toml"
    config.write_text('log_level = "INFO"\n')
    service.install()
    assert service.ctl("start", service.unit, check=False).returncode == 0
    first = service.main_pid()
    config.write_text('log_json = true\n')  # changed while it runs

    assert service.ctl("reload", service.unit, check=False).returncode == 0
    second = service.wait_for(lambda: (pid := service.show("MainPID", "ActiveState")) and
                              pid["ActiveState"] == "active" and pid["MainPID"] not in ("0", first) and pid["MainPID"],
                              what="the daemon started again")
    assert service.show("NRestarts")["NRestarts"] == "1"
    entries = service.journal()
    messages = _messages(entries)
    assert any(f"Main process exited, code=exited, status={RESTART_EXIT_STATUS}/" in m for m in messages), messages[-20:]
    assert not any("Failed with result" in m for m in messages)  # a reload is no failure
    # The new process reads the changed file: it writes JSON lines (to standard error, so the
    # journal has them as text), where the first one wrote to the journal natively.
    assert any(e.get("_PID") == first and "QIE_LOGGER" in e for e in entries)
    service.wait_for(lambda: any(e.get("_PID") == second and e.get("MESSAGE", "").startswith('{"time"')
                                 for e in service.journal()), what="a JSON line from the new process")
    service.ctl("stop", service.unit)


# The network -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on this machine's 127.0.0.1, which the container shares."""
    from tests.postgres import PostgresServer, Unavailable
    try:
        server = PostgresServer.start(tcp=True)
    except Unavailable as exc:
        pytest.skip(f"no PostgreSQL server here: {exc}")
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http_status(url: str) -> Optional[int]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except (OSError, urllib.error.URLError):
        return None


def _job_states(postgres, url: str) -> dict[str, str]:
    with postgres.connect(url.rsplit("/", 1)[1]) as conn:
        return dict(conn.execute("SELECT name, state FROM jobs ORDER BY id").fetchall())


def test_a_unit_for_a_postgresql_server_reaches_it_over_the_network_and_runs_the_job(make_service, postgres,
                                                                                    main_run):
    url = postgres.create_database(tcp=True)
    port = _free_port()
    service = make_service("postgres", QIE_DATABASE_URL=url, QIE_HTTP_LISTEN=f"127.0.0.1:{port}")
    service.folders.drop("edit", JOB)
    unit = unit_values(service.install())
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"] and "PrivateNetwork" not in unit
    assert service.ctl("start", service.unit, check=False).returncode == 0
    assert service.wait_for_output() == main_run.output
    service.wait_for(lambda: _job_states(postgres, url) == {"edit": "done"}, what="the job recorded as done")
    # The web pages the daemon serves are reachable too (the container shares this machine's network).
    service.wait_for(lambda: _http_status(f"http://127.0.0.1:{port}/healthz") == 200, what="/healthz answering")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs", timeout=10) as response:
        assert [job["name"] for job in json.load(response)["jobs"]] == ["edit"]
    assert service.ctl("stop", service.unit, check=False).returncode == 0


def test_a_unit_written_when_nothing_used_the_network_cannot_reach_a_server_configured_later_and_doctor_says_so(
        box, make_service, postgres):
    service = make_service("offline", QIE_HTTP_LISTEN="off", QIE_NOTIFY_JOB_URLS="false")
    config = service.folders.root / "qie-hotfolder.toml"
    config.write_text('log_level = "INFO"\n')
    unit = unit_values(service.install())
    assert (unit["PrivateNetwork"], unit["RestrictAddressFamilies"]) == (["yes"], ["AF_UNIX"])
    config.write_text(f'database_url = "{postgres.create_database(tcp=True)}"\n')  # configured afterwards

    assert service.ctl("start", service.unit, check=False).returncode != 0
    messages = _messages(service.journal())
    # libpq's socket() is refused (RestrictAddressFamilies=AF_UNIX); it reports little more than that.
    assert any("cannot use the database postgresql" in m for m in messages), [m for m in messages if "data" in m]
    service.ctl("stop", service.unit, check=False)  # no restart every 10 s meanwhile

    doctor = box.python("doctor", "--json", "--unit", f"/etc/systemd/system/{service.unit}.service",
                        env=service.env, cwd=service.path, check=False)
    check = next(c for c in json.loads(doctor.stdout)["checks"] if c["check"].startswith("unit "))
    assert not check["ok"] and "cuts the service off the network, which database_url needs" in check["detail"]


# A user manager ------------------------------------------------------------------------------

def test_a_user_unit_is_sandboxed_by_system_call_filters_alone(user_run):
    # A user manager gets namespaces (ProtectSystem=, PrivateTmp=, PrivateNetwork=, ...) only
    # through unprivileged user namespaces, and may not change the capability bounding set: the
    # unit uses what works without them (docs/operations.md).
    unit = user_run.unit_text.splitlines()
    assert "WantedBy=default.target" in unit
    options = {line.split("=", 1)[0] for line in unit if "=" in line and not line.startswith("#")}
    assert not options & {"User", "SupplementaryGroups", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateNetwork",
                          "CapabilityBoundingSet", "ReadWritePaths", "CacheDirectory"}
    assert {"NoNewPrivileges", "SystemCallFilter", "SystemCallArchitectures", "RestrictNamespaces",
            "RestrictAddressFamilies", "LockPersonality", "RestrictRealtime", "RestrictSUIDSGID"} <= options
    assert user_run.after["Result"] == "success"
