"""Notifications: written with the change they tell about, delivered from a durable outbox,
at least once, signed, to Apprise URLs and a webhook, across failures and a killed daemon."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from config import load_settings
from db import Database, jobs, notifications, utcnow
from db.schema import Notification
from processor.notify import Target, sign, targets_for
from tests.daemon import Folders, tiny_job

SECRET = "a-webhook-secret-of-some-length"
AVAILABLE = json.dumps(["Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors"])


class Receiver:
    """A local HTTP server that fails the first ``failures`` deliveries of every notification
    (by its idempotency key and path), then accepts; it records everything it was sent."""

    def __init__(self, failures: int = 2):
        self.failures = failures
        self.attempts: list[dict] = []
        self.accepted: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                entry = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                key = (self.path, entry["headers"].get("idempotency-key"))
                with receiver.lock:
                    receiver.attempts.append(entry)
                    tries = sum(1 for a in receiver.attempts
                                if (a["path"], a["headers"].get("idempotency-key")) == key)
                    accept = tries > receiver.failures
                    if accept:
                        receiver.accepted.append(entry)
                self.send_response(200 if accept else 500)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_every_event_reaches_each_target_once_signed_although_it_failed_twice_and_the_daemon_was_killed(folders: Folders):
    receiver = Receiver(failures=2)
    try:
        env = dict(QIE_NOTIFY_WEBHOOK_URL=f"http://127.0.0.1:{receiver.port}/hook", QIE_NOTIFY_WEBHOOK_SECRET=SECRET,
                   QIE_NOTIFY_URLS=json.dumps([f"json://127.0.0.1:{receiver.port}/apprise"]),
                   QIE_NOTIFY_RETRY_BACKOFF="3", QIE_FAKE__AVAILABLE_LORAS=AVAILABLE)
        folders.drop("good", tiny_job())
        folders.drop("bad", tiny_job(lora="missing.safetensors"))
        daemon = folders.serve(**env)
        with daemon:
            daemon.wait_for(lambda: len({(a["path"], a["headers"].get("idempotency-key")) for a in receiver.attempts}) >= 4,
                            what="a first (failed) delivery of both events to both targets")
            daemon.kill()  # in the middle of the retries
        assert len(receiver.accepted) < 4, "every delivery was done before the kill"
        restarted = folders.serve(**env)
        with restarted:
            restarted.wait_for(lambda: len(receiver.accepted) >= 4, timeout=60, what="every delivery accepted")
            restarted.wait_for(lambda: folders.db_rows("SELECT count(*) FROM notifications WHERE state = 'delivered'")
                               == [(2,)], what="the outbox rows marked delivered")
            restarted.stop()
        accepted = [(a["path"], a["headers"]["idempotency-key"]) for a in receiver.accepted]
        assert len(accepted) == len(set(accepted)) == 4  # once per event and target
        keys = {key for _, key in accepted}
        assert len(keys) == 2 and all(key.startswith("qie-") for key in keys)
        for attempt in receiver.attempts:  # the same key on every try: a receiver can drop repeats
            assert attempt["headers"]["idempotency-key"] in keys
        webhook = [a for a in receiver.accepted if a["path"] == "/hook"]
        events = {}
        for delivery in webhook:
            headers, body = delivery["headers"], delivery["body"]
            expected = "sha256=" + hmac.new(SECRET.encode(), headers["x-qie-timestamp"].encode() + b"." + body,
                                            hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["x-qie-signature"], expected)
            document = json.loads(body)
            assert document["key"] == headers["idempotency-key"]
            events[document["event"]] = document
        assert set(events) == {"done", "failed"}
        assert events["done"]["job"]["name"] == "good" and events["done"]["output"].endswith("good.png")
        assert events["failed"]["job"]["name"] == "bad" and "missing.safetensors" in events["failed"]["error"]
        apprise = [json.loads(a["body"]) for a in receiver.accepted if a["path"] == "/apprise"]
        assert sorted(d["title"].split(") ")[0].split("(")[1] + " " + d["title"].rsplit(" ", 1)[1] for d in apprise) == [
            "bad failed", "good done"]
        tries = Counter((a["path"], a["headers"]["idempotency-key"]) for a in receiver.attempts)
        assert set(tries.values()) == {3}  # failed twice, then accepted: the kill lost no try and made none twice
    finally:
        receiver.close()


def test_a_notification_is_written_with_the_change_it_tells_about(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with db.begin() as session:
            jobs.add_event(session, None, "alarm", "the inbox /x is missing (share unmounted?)", level="error")
            jobs.add_event(session, None, "alarm", "the inbox /x is back", level="warning")  # an all-clear: no message
            jobs.add_event(session, None, "rejected", "bad job file", level="error")
        with db.begin() as session:
            rows = notifications.due(session, utcnow())
            assert [(n.event, n.message) for n in rows] == [("alarm", "the inbox /x is missing (share unmounted?)")]
        # A transaction that fails writes neither the event nor its notification.
        try:
            with db.begin() as session:
                jobs.add_event(session, None, "alarm", "disk full", level="error")
                raise RuntimeError("rolled back")
        except RuntimeError:
            pass
        with db.begin() as session:
            assert notifications.counts(session) == {"pending": 1}
    finally:
        db.close()


def test_targets_follow_notify_on_and_the_presets_own_urls(tmp_path: Path):
    settings = load_settings(None, work=tmp_path, notify_urls=["ntfys://ntfy.sh/topic"], notify_on=["failed", "alarm"],
                             notify_webhook_url="https://hooks.example/x", notify_webhook_secret=SECRET)
    done = Notification(event="done", key="k1", title="t", message="m", payload={})
    failed = Notification(event="failed", key="k2", title="t", message="m", payload={})
    alarm = Notification(event="alarm", key="k3", title="t", message="m", payload={})
    preset_url = ["json://phone.example/notify"]
    assert targets_for(settings, done, preset_url) == [Target("apprise", preset_url[0])]
    assert {t.kind for t in targets_for(settings, failed, preset_url)} == {"apprise", "webhook"}
    assert len(targets_for(settings, failed, preset_url)) == 3
    assert targets_for(settings, alarm, preset_url) == [Target("apprise", "ntfys://ntfy.sh/topic"),
                                                        Target("webhook", "https://hooks.example/x")]
    closed = settings.model_copy(update={"notify_job_urls": False})
    assert targets_for(closed, done, preset_url) == []
    assert Target("apprise", "mailtos://user:secret@mail.example").name == "apprise mailtos://mail.example"
    assert sign("k", "1", b"{}") == "sha256=" + hmac.new(b"k", b"1.{}", hashlib.sha256).hexdigest()
