"""Running as a service: systemd notifications over a real unix datagram socket, graceful stop
by signal, and the unit file. The daemon is the real process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from config import Settings
from processor.cli import EXIT_CONFIGURATION, EXIT_DATABASE
from processor.systemd import (RESTART_EXIT_STATUS, RESTART_PREVENT_EXIT_STATUS, Notifier, UnitOptions, check_unit,
                               existing_groups, gpu_device_groups, installed_version, network_uses, service_groups,
                               unit_text, unit_values)
from tests.daemon import ROOT, Folders, tiny_job


class NotifySocket:
    """What systemd listens on: a unix datagram socket; collects every message sent to it."""

    def __init__(self, abstract: bool = False):
        self._dir = tempfile.mkdtemp(prefix="qie-notify-")  # short: unix socket paths are limited to 108 bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"qie-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._running = True
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def fields(self) -> list[tuple[float, str]]:
        """Every ``KEY=value`` line received, in order, with when its message arrived."""
        return [(at, line) for at, message in list(self.messages) for line in message.split("\n")]

    def first(self, prefix: str) -> int:
        """Index (in ``fields()``) of the first line starting with ``prefix``, -1 when none."""
        return next((i for i, (_, line) in enumerate(self.fields()) if line.startswith(prefix)), -1)

    def wait_for(self, predicate, timeout: float = 60, what: str = "a message") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; got {[line for _, line in self.fields()]}")

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2)
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "NotifySocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# sd_notify itself --------------------------------------------------------------------------------

def test_the_notifier_sends_to_a_path_and_to_the_abstract_namespace():
    for abstract in (False, True):
        with NotifySocket(abstract=abstract) as listener:
            notifier = Notifier.from_environment({"NOTIFY_SOCKET": listener.address})
            notifier.ready("ready: watching /inbox")
            notifier.stopping()
            listener.wait_for(lambda: listener.first("STOPPING=1") >= 0, timeout=5)
            notifier.close()
        lines = [line for _, line in listener.fields()]
        assert lines[:2] == ["READY=1", "STATUS=ready: watching /inbox"]
        assert "STOPPING=1" in lines


def test_without_notify_socket_nothing_is_sent_and_nothing_fails():
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.status("y")
    notifier.watchdog()
    notifier.extend_timeout(600)
    notifier.stopping()
    assert notifier.seconds_to_next_ping() is None


def test_the_watchdog_pings_at_half_the_interval_and_a_long_load_raises_it_until_the_next_ping():
    now = [100.0]
    with NotifySocket() as listener:
        notifier = Notifier(listener.address, watchdog_usec=2_000_000, clock=lambda: now[0])
        assert notifier.watchdog_interval == 1.0
        notifier.ready("ready")
        notifier.watchdog()  # not due yet
        now[0] += 1.0
        notifier.watchdog()  # due
        notifier.extend_timeout(600, "loading the transformer model")
        now[0] += 0.1
        notifier.status("job 1 (x): sample step 1/4")  # the load is over: the unit's interval again
        listener.wait_for(lambda: listener.first("STATUS=job 1") >= 0, timeout=5)
        notifier.close()
        lines = [line for _, line in listener.fields()]
    assert lines == ["READY=1", "STATUS=ready", f"MAINPID={os.getpid()}",
                     "WATCHDOG=1",
                     "EXTEND_TIMEOUT_USEC=600000000", "STATUS=loading the transformer model",
                     "WATCHDOG=1", "WATCHDOG_USEC=600000000",
                     "STATUS=job 1 (x): sample step 1/4", "WATCHDOG=1", "WATCHDOG_USEC=2000000"]


def test_a_watchdog_meant_for_another_process_is_ignored():
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                                          "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.watchdog_interval is None


# The daemon under a (pretend) systemd ------------------------------------------------------------

def test_the_daemon_tells_systemd_ready_status_watchdog_and_stopping(folders: Folders):
    folders.drop("notify", tiny_job(steps=4))
    with NotifySocket() as listener:
        with folders.serve(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="600000") as daemon:
            listener.wait_for(lambda: listener.first("READY=1") >= 0, what="READY=1")
            daemon.wait_for(lambda: (folders.outbox / "notify.png").exists(), what="the output")
            # Idle now: the loop keeps pinging at half the watchdog interval (0.3 s).
            idle_from = time.monotonic()
            time.sleep(1.5)
            pings = [at for at, line in listener.fields() if line == "WATCHDOG=1" and at >= idle_from]
            assert daemon.stop() == 0
        listener.wait_for(lambda: listener.first("STOPPING=1") >= 0, timeout=5, what="STOPPING=1")
        lines = [line for _, line in listener.fields()]

    ready = lines.index("READY=1")
    sampling = next(i for i, line in enumerate(lines) if line.startswith("STATUS=job 1 (notify): sample step"))
    stopping = lines.index("STOPPING=1")
    assert ready < sampling < stopping
    assert "STATUS=job 1 (notify): sample step 4/4" in lines
    # Model loads ask for time first (the tiny model loads quickly, the real one does not).
    loads = [i for i, line in enumerate(lines) if line.startswith("EXTEND_TIMEOUT_USEC=600000000")]
    assert loads and ready < loads[0] < stopping
    assert any(line.startswith("STATUS=idle") for line in lines[sampling:stopping])
    assert len(pings) >= 3, pings
    assert max(b - a for a, b in zip(pings, pings[1:])) < 0.6  # never longer than systemd allows


def test_sigterm_stops_at_a_step_boundary_and_the_next_start_resumes_with_the_same_bytes(folders: Folders,
                                                                                         tmp_path):
    reference = Folders(tmp_path / "reference")
    reference.drop("edit", tiny_job(seed=5, steps=6))
    assert reference.run("serve", "--once").returncode == 0
    expected = (reference.outbox / "edit.png").read_bytes()

    # Preconditions: the job is sampling, held for 3 s just after step 2 was checkpointed.
    folders.drop("edit", tiny_job(seed=5, steps=6))
    with NotifySocket() as listener:
        with folders.serve(QIE_FAULTS="stage.sample.step2=pause:3", NOTIFY_SOCKET=listener.address) as daemon:
            daemon.wait_for(lambda: folders.db_rows("SELECT step FROM jobs WHERE stage = 'sample' AND step >= 2"),
                            what="sampling step 2")
            # Action: SIGTERM, as `systemctl stop` sends.
            signalled = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            code = daemon.wait_exit(timeout=60)
            took = time.monotonic() - signalled
        fields = listener.fields()
        lines = [line for _, line in fields]

    # Postconditions: exit 0 well within the stop timeout, the job queued again (no crash counted)
    # and its sampling interrupted after step 2; systemd was told and asked for time meanwhile.
    assert code == 0, daemon.log[-3000:]
    assert took < 20, took
    assert folders.db_rows("SELECT state, crashes FROM jobs") == [("queued", 0)]
    assert ("sample", 0, None, "interrupted") in folders.stage_runs(1)
    assert folders.db_rows("SELECT kind FROM events WHERE job_id = 1 AND kind = 'released'") == [("released",)]
    assert not (folders.outbox / "edit.png").exists()
    # systemd hears of the stop at once, while the step is still in hand (the pause lasts 3 s).
    stopping = lines.index("STOPPING=1")
    assert fields[stopping][0] - signalled < 1.5
    assert lines[stopping + 1].startswith("STATUS=stopping: finishing the current step of job 1 (edit): sample")
    assert "EXTEND_TIMEOUT_USEC=120000000" in lines[stopping:]
    assert "stop requested" in daemon.log

    # The next start resumes sampling after step 2 and publishes the same bytes.
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    assert (folders.outbox / "edit.png").read_bytes() == expected
    assert folders.db_rows("SELECT state, crashes FROM jobs") == [("done", 0)]
    assert folders.db_rows("SELECT resumed_from_step FROM stage_runs WHERE stage = 'sample' AND error IS NULL") == [(2,)]


# The unit file -----------------------------------------------------------------------------------

def test_the_repository_unit_file_is_current():
    assert (ROOT / "deploy" / "qie-hotfolder.service").read_text() == unit_text(UnitOptions.example()), \
        "regenerate: python -c 'from processor.systemd import *; print(unit_text(UnitOptions.example()), end=\"\")' " \
        "> deploy/qie-hotfolder.service"


def test_install_service_prints_a_unit_with_this_machines_paths(folders: Folders):
    (folders.root / "qie-hotfolder.toml").write_text('log_level = "INFO"\n')
    result = folders.run("install-service", "--print")
    assert result.returncode == 0, result.stderr
    unit = result.stdout
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start == (f"ExecStart={sys.executable} {ROOT / 'run.py'} serve "
                          f"--config {folders.root / 'qie-hotfolder.toml'}")
    assert f"WorkingDirectory={folders.root}" in unit
    for expected in ("Type=notify", "WatchdogSec=120s", "Restart=on-failure", "KillMode=mixed", "TimeoutStopSec=120s",
                     "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                     f"Environment=QIE_INBOX={folders.inbox}"):
        assert expected in unit.splitlines(), expected
    # The database lives in the folders' parent here, which therefore covers every folder. It is
    # in /tmp, which PrivateTmp= replaces: bound into the service's own /tmp instead.
    writable = "BindPaths" if str(folders.root).startswith(("/tmp/", "/var/tmp/")) else "ReadWritePaths"
    assert [line for line in unit.splitlines() if line.startswith(("ReadWritePaths=", "BindPaths="))] == \
        [f"{writable}={folders.root}"]
    assert not [line for line in unit.splitlines() if line.startswith(("PrivateDevices=", "DevicePolicy=", "DeviceAllow="))]

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    path = folders.root / "qie-hotfolder.service"
    path.write_text(unit)
    verify = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    if "Failed to" in verify.stderr and "bus" in verify.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {verify.stderr.strip()}")
    assert verify.returncode == 0, verify.stderr


def test_install_service_refuses_a_unit_whose_account_does_not_exist(folders: Folders):
    target = folders.root / "qie.service"
    result = folders.run("install-service", "--run-as", "no-such-account", "--output", str(target))
    assert result.returncode == 1
    assert "user no-such-account does not exist (the unit fails with status=217/USER)" in result.stderr
    assert not target.exists()


def test_doctor_reports_a_unit_whose_user_groups_or_paths_are_missing(folders: Folders):
    unit = unit_text(UnitOptions(python=sys.executable, run_py=str(ROOT / "run.py"), working_directory=str(folders.root),
                                 config_file=str(folders.root / "gone.toml"),
                                 writable=[str(folders.work), str(folders.root / "gone")], user="no-such-account",
                                 groups=["video", "no-such-group"], network=[]))
    path = folders.root / "qie.service"
    path.write_text(unit)
    result = folders.run("doctor", "--json", "--unit", str(path), QIE_DATABASE_URL="postgresql://db.example/qie",
                         QIE_HTTP_LISTEN="off", QIE_NOTIFY_JOB_URLS="false")
    assert result.returncode == 1
    check = next(c for c in json.loads(result.stdout)["checks"] if c["check"] == f"unit {path}")
    assert not check["ok"]
    for expected in ("user no-such-account does not exist", "group no-such-group does not exist",
                     f"{folders.root / 'gone.toml'} does not exist (the daemon exits with status 2)",
                     f"{folders.root / 'gone'} does not exist (status=226/NAMESPACE)",
                     "cuts the service off the network, which database_url needs"):
        assert expected in check["detail"], check["detail"]
    assert str(folders.work) not in check["detail"]  # present and writable


def test_doctor_passes_a_unit_install_service_wrote(folders: Folders):
    path = folders.root / "qie.service"
    assert folders.run("install-service", "--output", str(path)).returncode == 0
    result = folders.run("doctor", "--json", "--unit", str(path))
    check = next(c for c in json.loads(result.stdout)["checks"] if c["check"] == f"unit {path}")
    assert check["ok"], check["detail"]


def test_a_folder_the_services_account_may_not_write_is_named():
    import pwd
    nobody = pwd.getpwnam("nobody")
    if os.getuid() == nobody.pw_uid:
        pytest.skip("this test runs as nobody")
    with tempfile.TemporaryDirectory() as base:  # (pytest's tmp_path lies in a folder only its owner may enter)
        os.chmod(base, 0o755)
        folder = Path(base) / "outbox"
        folder.mkdir(mode=0o755)
        unit = f"[Service]\nUser=nobody\nReadWritePaths={folder}\n"
        assert check_unit(unit) == [f"nobody may not write {folder} (owner {pwd.getpwuid(os.getuid()).pw_name}, "
                                    "mode 755): change its owner or mode"]
        folder.chmod(0o777)
        assert check_unit(unit) == []
        os.chmod(base, 0o700)  # the folder is fine, the way to it is not
        assert check_unit(unit) == [f"nobody may not write {folder} (owner {pwd.getpwuid(os.getuid()).pw_name}, "
                                    "mode 777): change its owner or mode"]


def test_only_gpu_groups_this_machine_has_are_named(tmp_path):
    groups = service_groups()
    assert groups == existing_groups(groups)
    assert set(groups) >= set(existing_groups(["render", "video"]))
    if os.geteuid() != 0:
        pytest.skip("making device nodes needs root")
    import grp
    video = existing_groups(["video"])
    if not video:
        pytest.skip("no video group here")
    (tmp_path / "dri").mkdir()
    os.mknod(tmp_path / "dri" / "renderD128", 0o660 | stat.S_IFCHR, os.makedev(226, 128))
    os.chown(tmp_path / "dri" / "renderD128", 0, grp.getgrnam("video").gr_gid)
    os.mknod(tmp_path / "nvidiactl", 0o666 | stat.S_IFCHR, os.makedev(195, 255))
    os.chmod(tmp_path / "nvidiactl", 0o666)  # usable by everyone: no group needed
    assert gpu_device_groups(tmp_path) == ["video"]


def test_what_needs_the_network_is_read_from_the_settings():
    assert network_uses({"database_url": None, "state": "state.db"}) == []
    assert network_uses({"database_url": "sqlite:////var/lib/qie/state.db"}) == []
    assert network_uses({"database_url": "postgresql+psycopg://qie@db/qie"}) == ["database_url"]
    assert network_uses({"http_listen": "off", "notify_urls": [], "notify_job_urls": False}) == []
    assert network_uses({"http_listen": "127.0.0.1:8765", "notify_urls": ["ntfys://ntfy.sh/topic"],
                         "notify_webhook_url": "https://example.com/hook", "notify_job_urls": True}) == \
        ["http_listen", "notify_urls", "notify_webhook_url", "notify_job_urls"]
    # The defaults: the web pages on 127.0.0.1, and notification URLs that presets may name.
    assert network_uses(Settings().model_dump()) == ["http_listen", "notify_job_urls"]


def test_the_network_is_cut_off_unless_a_setting_needs_it():
    options = UnitOptions.example()
    options.network = []
    cut_off = unit_values(unit_text(options))
    assert (cut_off["PrivateNetwork"], cut_off["IPAddressDeny"], cut_off["RestrictAddressFamilies"]) == \
        (["yes"], ["any"], ["AF_UNIX"])
    options.network = ["database_url"]
    reachable = unit_values(unit_text(options))
    assert "PrivateNetwork" not in reachable and "IPAddressDeny" not in reachable
    assert reachable["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


def test_what_the_service_needs_from_home_directories_and_tmp_is_bound_into_its_empty_ones():
    options = UnitOptions.example()
    values = unit_values(unit_text(options))
    assert (values["ProtectHome"], values["PrivateTmp"]) == (["yes"], ["yes"]) and "BindPaths" not in values
    options.readable = ["/root/.pyenv/versions/3.11.7", "/srv/qie-hotfolder", "/tmp/ci/checkout"]
    options.writable = [*options.writable, "/home/anna/outbox", "/var/tmp/qie/work"]
    values = unit_values(unit_text(options))
    assert (values["ProtectHome"], values["PrivateTmp"]) == (["tmpfs"], ["yes"])
    assert values["BindReadOnlyPaths"] == ["/tmp/ci/checkout", "/root/.pyenv/versions/3.11.7"]
    assert values["BindPaths"] == ["/home/anna/outbox", "/var/tmp/qie/work"]
    assert not {"/home/anna/outbox", "/var/tmp/qie/work"} & set(values["ReadWritePaths"])
    # Only /tmp: home directories stay hidden.
    options.readable, options.writable = ["/tmp/ci/checkout"], ["/srv/qie-hotfolder/inbox"]
    values = unit_values(unit_text(options))
    assert values["ProtectHome"] == ["yes"] and values["BindReadOnlyPaths"] == ["/tmp/ci/checkout"]


def test_protect_clock_is_left_out_where_it_would_hide_the_gpu():
    # Before systemd 252, ProtectClock=yes implied DeviceAllow=char-rtc, which closes every other device.
    options = UnitOptions.example()
    assert unit_values(unit_text(options))["ProtectClock"] == ["yes"]
    options.systemd_version = 251
    assert "ProtectClock" not in unit_values(unit_text(options))
    for version in (None, 251, 252):
        options.systemd_version = version
        values = unit_values(unit_text(options))
        assert not values.keys() & {"PrivateDevices", "DevicePolicy", "DeviceAllow", "MemoryDenyWriteExecute"}


def test_the_systemd_version_is_read_from_systemctl_and_unknown_without_it():
    from types import SimpleNamespace

    def systemctl(*args, **kwargs):
        return SimpleNamespace(stdout="systemd 252 (252.38-1~deb12u1)\n+PAM +AUDIT +SELINUX\n")

    def missing(*args, **kwargs):
        raise FileNotFoundError("systemctl")

    assert installed_version(systemctl) == 252
    assert installed_version(missing) is None


def test_restarts_are_prevented_for_every_exit_status_listed_in_one_place():
    assert set(RESTART_PREVENT_EXIT_STATUS) == {EXIT_CONFIGURATION, EXIT_DATABASE}
    unit = unit_text(UnitOptions.example())
    values = unit_values(unit)
    assert values["RestartPreventExitStatus"] == [" ".join(map(str, RESTART_PREVENT_EXIT_STATUS))]
    for status, why in RESTART_PREVENT_EXIT_STATUS.items():
        assert f"#   {status}: {why}" in unit.splitlines()
    # A reload (SIGHUP) ends in a success that is restarted.
    assert values["SuccessExitStatus"] == values["RestartForceExitStatus"] == [str(RESTART_EXIT_STATUS)]
    assert values["ExecReload"][0].endswith(" $MAINPID")


def test_a_user_unit_uses_only_what_a_user_manager_can_apply():
    options = UnitOptions.example()
    options.user_unit, options.network = True, []
    values = unit_values(unit_text(options))
    assert not values.keys() & {"User", "SupplementaryGroups", "ProtectSystem", "ProtectHome", "PrivateTmp",
                                "PrivateNetwork", "CapabilityBoundingSet", "ReadWritePaths", "IPAddressDeny"}
    assert values["SystemCallFilter"] == ["@system-service", "~@privileged:EPERM"]
    assert values["NoNewPrivileges"] == ["yes"] and values["RestrictAddressFamilies"] == ["AF_UNIX"]


def _exposure(unit: str, folder) -> tuple[int, str]:
    path = folder / "qie-hotfolder.service"
    path.write_text(unit)
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20", str(path)],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, (result.stdout.strip().splitlines() or [result.stderr])[-1]


@pytest.mark.parametrize("user", ["qie", "root"])
@pytest.mark.parametrize("network", [[], ["database_url"]], ids=["no-network", "postgresql"])
@pytest.mark.parametrize("home", [[], ["/root/.pyenv/versions/3.11.7"]], ids=["python-in-usr", "python-in-root"])
def test_systemd_analyze_security_rates_the_unit_at_most_2_0_as_root_and_as_a_service_user(tmp_path, user, network,
                                                                                          home):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    options = UnitOptions.example()
    options.user, options.network, options.readable = user, network, [*options.readable, *home]
    code, verdict = _exposure(unit_text(options), tmp_path)
    if "--offline" in verdict or "unrecognized option" in verdict:
        pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {verdict}")
    exposure = float(verdict.split(": ")[1].split()[0])
    assert code == 0 and exposure <= 2.0, verdict
