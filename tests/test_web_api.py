"""The web server's JSON API and files, through httpx (FastAPI's TestClient): every endpoint,
the token rules, cross-site requests, path traversal on the file endpoints, and uploads that
must be refused without leaving anything behind."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from config import load_settings
from db import Database
from tests.daemon import Folders, make_image, tiny_job
from web import WebConfigError, create_app, required_token

LOOPBACK = "http://127.0.0.1:8765"
BROKEN_LORA = tiny_job(lora="missing.safetensors")
AVAILABLE = json.dumps(["Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors"])


def settings_of(folders: Folders, **overrides):
    env = folders.env()
    values = {key[4:].lower(): value for key, value in env.items() if key.startswith("QIE_") and "__" not in key}
    values.update(overrides)
    return load_settings(None, **values)


def png_bytes(size=(32, 32), colour=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def folders_with_preset(root: Path) -> Folders:
    """Folders with a preset ``winter`` and an empty database."""
    folders = Folders(root)
    (folders.inbox / "winter").mkdir()
    (folders.inbox / "winter" / "preset.json").write_text(json.dumps({"prompt": "make it winter"}))
    Database(f"sqlite:///{folders.state}").close()
    return folders


def inbox_listing(folders: Folders) -> list[str]:
    return sorted(str(p.relative_to(folders.inbox)) for p in folders.inbox.rglob("*"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Folders:
    """Two done jobs (one from a preset), one failed job (a missing LoRA), a preset folder."""
    folders = Folders(tmp_path_factory.mktemp("site"))
    folders.drop("first", tiny_job(seed=1))
    folders.drop("second", tiny_job(seed=2))
    folders.drop("broken", BROKEN_LORA)
    winter = folders.inbox / "winter"
    winter.mkdir()
    (winter / "preset.json").write_text(json.dumps({"prompt": "make it winter", "megapixels": 0.004, "steps": 2}))
    make_image(folders.root / "staged.png")
    os.rename(folders.root / "staged.png", winter / "snow.png")
    result = folders.run("serve", "--once", QIE_FAKE__AVAILABLE_LORAS=AVAILABLE)
    assert result.returncode == 0, result.stderr
    return folders


@pytest.fixture
def client(site: Folders):
    app = create_app(settings_of(site), token=None)
    with TestClient(app, base_url=LOOPBACK) as client:
        yield client
    app.state.ctx.db.close()


def job_id(client: TestClient, name: str) -> int:
    return next(j["id"] for j in client.get("/api/jobs", params={"per_page": 200}).json()["jobs"] if j["name"] == name)


# Reading -------------------------------------------------------------------------------------------

def test_the_job_list_is_filtered_by_state_and_preset_and_paginated(client: TestClient):
    everything = client.get("/api/jobs").json()
    assert everything["total"] == 4 and [j["id"] for j in everything["jobs"]] == sorted(
        (j["id"] for j in everything["jobs"]), reverse=True)
    done = client.get("/api/jobs", params={"state": "done"}).json()
    assert {j["name"] for j in done["jobs"]} == {"first", "second", "winter/snow"}
    assert all(j["links"]["thumbnail"].endswith("/thumbs/output") for j in done["jobs"])
    failed = client.get("/api/jobs", params={"state": "failed"}).json()["jobs"]
    assert [j["name"] for j in failed] == ["broken"]
    assert "missing.safetensors" in failed[0]["error"] and failed[0]["error_text"].startswith("This job cannot succeed")
    assert failed[0]["can_retry"] and not failed[0]["can_cancel"]
    assert [j["name"] for j in client.get("/api/jobs", params={"preset": "winter"}).json()["jobs"]] == ["winter/snow"]
    second_page = client.get("/api/jobs", params={"per_page": 3, "page": 2}).json()
    assert second_page["pages"] == 2 and len(second_page["jobs"]) == 1
    assert client.get("/api/jobs", params={"state": "done,failed"}).json()["total"] == 4
    bad = client.get("/api/jobs", params={"state": "exploded"})
    assert bad.status_code == 400 and "exploded" in bad.json()["detail"]
    assert client.get("/api/jobs", params={"per_page": 100000}).status_code == 422


def test_a_job_is_shown_with_its_parameters_stages_and_events_like_run_py_show(client: TestClient, site: Folders):
    first = job_id(client, "first")
    detail = client.get(f"/api/jobs/{first}").json()
    shown = json.loads(site.run("show", str(first), "--json").stdout)
    assert detail["prompt"] == shown["prompt"] and detail["parameters"] == shown["parameters"]
    assert [r["stage"] for r in detail["stage_runs"]] == [r["stage"] for r in shown["stage_runs"]]
    assert [e["kind"] for e in detail["events"]][-1] == "done"
    assert detail["summary"]["state"] == "done"
    assert client.get("/api/jobs/9999").status_code == 404
    assert client.get("/api/jobs/abc").status_code == 422
    assert client.get("/api/presets").json() == {"presets": ["winter"]}
    daemons = client.get("/api/daemons").json()
    assert daemons["daemons"] and daemons["daemons"][0]["health"] == "stopped"


def test_a_jobs_files_are_served_by_its_id(client: TestClient, site: Folders):
    first = job_id(client, "first")
    output = client.get(f"/api/jobs/{first}/output")
    assert output.status_code == 200 and output.content == (site.outbox / "first.png").read_bytes()
    manifest = client.get(f"/api/jobs/{first}/manifest")
    assert manifest.status_code == 200 and "attachment" in manifest.headers["content-disposition"]
    assert manifest.json()["job"]["id"] == first
    for which in ("output", "image1"):
        thumb = client.get(f"/api/jobs/{first}/thumbs/{which}")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 320
    broken = job_id(client, "broken")
    assert client.get(f"/api/jobs/{broken}/output").status_code == 404
    assert client.get(f"/api/jobs/{broken}/thumbs/image1").status_code == 200  # its inputs stay in work/
    assert client.get(f"/api/jobs/{first}/thumbs/image2").status_code == 404


@pytest.mark.parametrize("path", [
    "/api/jobs/1/thumbs/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/jobs/1/thumbs/%2e%2e%2fstate.db",
    "/api/jobs/1/output/../../../state.db",
    "/api/jobs/..%2F..%2Fstate.db/output",
    "/static/..%2F..%2Fstate.db",
    "/static/../config/settings.py",
    "/api/jobs/1/thumbs/output%00.png",
    "/api/jobs/1/thumbs//etc/passwd",
])
def test_paths_in_requests_never_reach_files_outside_the_served_folders(client: TestClient, path: str):
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code, response.text[:200])
    assert b"root:" not in response.content and b"SQLite format" not in response.content


def test_the_openapi_schema_lists_the_endpoints(client: TestClient):
    schema = client.get("/openapi.json").json()
    for path in ("/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/retry", "/api/jobs/{job_id}/cancel",
                 "/api/jobs/{job_id}/output", "/api/jobs/{job_id}/thumbs/{which}", "/api/events", "/healthz",
                 "/readyz", "/metrics"):
        assert path in schema["paths"], path
    assert "post" in schema["paths"]["/api/jobs"]


def test_health_needs_a_ticking_daemon_and_readiness_the_engine_and_inbox(client: TestClient, site: Folders):
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["daemons"]  # the daemon of `serve --once` stopped
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.json()
    assert ready.json()["checks"]["engine"] == "fake: installed"
    app = create_app(settings_of(site, inbox=site.root / "gone"), token=None)
    with TestClient(app, base_url=LOOPBACK) as other:
        assert other.get("/readyz").status_code == 503


def test_the_pages_render(client: TestClient):
    for path in ("/", "/?state=failed", "/?state=active&preset=winter", "/failed", "/upload", "/daemons", "/jobs/1"):
        page = client.get(path)
        assert page.status_code == 200 and page.text.startswith("<!doctype html>"), path
    assert "winter/snow" in client.get("/?preset=winter").text
    assert "This job cannot succeed" in client.get("/failed").text


# Changing ------------------------------------------------------------------------------------------

def test_retry_and_cancel_go_through_the_same_transitions_as_the_cli(site: Folders):
    app = create_app(settings_of(site), token=None)
    with TestClient(app, base_url=LOOPBACK) as client:
        broken = job_id(client, "broken")
        retried = client.post(f"/api/jobs/{broken}/retry")
        assert retried.status_code == 200 and retried.json()["state"] == "queued"
        again = client.post(f"/api/jobs/{broken}/retry")
        assert again.status_code == 409 and "only failed or cancelled" in again.json()["detail"]
        cancelled = client.post(f"/api/jobs/{broken}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert client.post(f"/api/jobs/{broken}/cancel").status_code == 409
        assert client.post("/api/jobs/9999/retry").status_code == 404
        events = [e["kind"] for e in client.get(f"/api/jobs/{broken}").json()["events"]]
        assert events[-2:] == ["queued", "cancelled"]
        # Put it back as it was for the other tests: failed, through the CLI's own command.
        assert site.run("retry", str(broken)).returncode == 0
    result = site.run("serve", "--once", QIE_FAKE__AVAILABLE_LORAS=AVAILABLE)
    assert result.returncode == 0
    assert site.job_states()["broken"] == "failed"
    app.state.ctx.db.close()


def test_uploads_land_in_the_inbox_as_drops(tmp_path: Path):
    folders = folders_with_preset(tmp_path)
    app = create_app(settings_of(folders), token=None)
    with TestClient(app, base_url=LOOPBACK) as client:
        preset = client.post("/api/jobs", data={"preset": "winter"},
                              files=[("photos", ("a.png", png_bytes(), "image/png")),
                                     ("photos", ("b.png", png_bytes(), "image/png"))])
        assert preset.status_code == 201, preset.text
        assert preset.json()["placed"] == ["winter/a.png", "winter/b.png"]
        prompt = client.post("/api/jobs", data={"prompt": "make the sky purple", "steps": "2", "seed": "5"},
                             files=[("photos", ("sky.png", png_bytes(), "image/png"))])
        assert prompt.status_code == 201 and prompt.json()["placed"] == ["sky"]
        assert json.loads((folders.inbox / "sky" / "job.json").read_text()) == {
            "prompt": "make the sky purple", "image1": "sky.png", "steps": 2, "seed": 5}
        job = json.dumps(tiny_job(image1="x.png")).encode()
        with_file = client.post("/api/jobs", files=[("photos", ("x.png", png_bytes(), "image/png")),
                                                    ("job", ("job.json", job, "application/json"))])
        assert with_file.status_code == 201 and with_file.json()["placed"] == ["upload"]
        # Nothing hidden is left behind in the inbox.
        assert [p for p in inbox_listing(folders) if "/." in "/" + p] == []
    app.state.ctx.db.close()
    assert folders.run("serve", "--once").returncode == 0
    assert sorted(folders.job_states()) == ["sky", "upload", "winter/a", "winter/b"]
    assert set(folders.job_states().values()) == {"done"}


@pytest.mark.parametrize("data, files, status, reason", [
    ({"preset": "winter"}, [("photos", ("notes.txt", b"hello", "text/plain"))], 400, "not an image name"),
    ({"preset": "winter"}, [("photos", ("fake.png", b"not a png at all", "image/png"))], 400, "not an image this daemon can read"),
    ({"preset": "winter"}, [("photos", ("half.png", png_bytes()[:60], "image/png"))], 400, "fake"),
    ({"preset": "winter"}, [("photos", (".hidden.png", png_bytes(), "image/png"))], 400, "hidden or temporary"),
    ({"preset": "winter"}, [("photos", ("../../escape.png", png_bytes(), "image/png"))], 400, "not a plain file name"),
    ({"preset": "summer"}, [("photos", ("a.png", png_bytes(), "image/png"))], 400, "no preset folder 'summer'"),
    ({"preset": "winter", "prompt": "x"}, [("photos", ("a.png", png_bytes(), "image/png"))], 400, "exactly one"),
    ({"prompt": "x", "steps": "many"}, [("photos", ("a.png", png_bytes(), "image/png"))], 400, "not a int"),
    ({"prompt": "x", "steps": "999"}, [("photos", ("a.png", png_bytes(), "image/png"))], 400, "steps"),
    ({"prompt": "x"}, [], 400, "no photo"),
    ({}, [("photos", ("a.png", png_bytes(), "image/png")), ("job", ("job.json", b"{nope", "application/json"))],
     400, "invalid JSON"),
])
def test_bad_uploads_get_a_clear_4xx_and_nothing_is_written(tmp_path: Path, data, files, status, reason):
    folders = folders_with_preset(tmp_path)
    before = inbox_listing(folders)
    app = create_app(settings_of(folders), token=None)
    with TestClient(app, base_url=LOOPBACK) as client:
        response = client.post("/api/jobs", data=data, files=files or None)
    app.state.ctx.db.close()
    assert response.status_code == status, response.text
    if reason != "fake":
        assert reason in response.json()["detail"]
    assert inbox_listing(folders) == before


def test_oversized_and_malformed_uploads_are_refused_before_anything_is_written(tmp_path: Path):
    folders = folders_with_preset(tmp_path)
    before = inbox_listing(folders)
    app = create_app(settings_of(folders, max_upload_bytes=10_000), token=None)
    big = png_bytes((600, 600), (1, 2, 3)) + os.urandom(1_200_000)
    with TestClient(app, base_url=LOOPBACK) as client:
        announced = client.post("/api/jobs", data={"preset": "winter"}, files=[("photos", ("big.png", big, "image/png"))])
        assert announced.status_code == 413 and "max_upload_bytes" in announced.json()["detail"]

        def chunks():
            yield b"--x\r\nContent-Disposition: form-data; name=\"photos\"; filename=\"big.png\"\r\n\r\n"
            for _ in range(40):
                yield os.urandom(50_000)
        streamed = client.post("/api/jobs", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert streamed.status_code == 413
        # Under the request limit, over max_upload_bytes once written: refused, the staging removed.
        written = client.post("/api/jobs", data={"preset": "winter"},
                              files=[("photos", ("a.png", png_bytes((200, 200)) + os.urandom(12_000), "image/png"))])
        assert written.status_code == 413 and "max_upload_bytes" in written.json()["detail"]
        malformed = client.post("/api/jobs", content=b"--nope\r\ngarbage",
                                headers={"content-type": "multipart/form-data; boundary=other"})
        assert malformed.status_code == 400, malformed.text
        no_boundary = client.post("/api/jobs", content=b"x", headers={"content-type": "multipart/form-data"})
        assert no_boundary.status_code == 400
    app.state.ctx.db.close()
    assert inbox_listing(folders) == before


# Security ------------------------------------------------------------------------------------------

def test_on_a_network_address_the_server_refuses_to_start_without_a_token(site: Folders, tmp_path: Path):
    settings = settings_of(site, http_listen="0.0.0.0:8765", http_token_file=tmp_path / "token")
    with pytest.raises(WebConfigError, match="refusing to serve pages to the network"):
        required_token(settings, "0.0.0.0")
    # The daemon says so and does not start.
    refused = site.run("serve", QIE_HTTP_LISTEN="0.0.0.0:8765", QIE_HTTP_TOKEN_FILE=str(tmp_path / "token"))
    assert refused.returncode == 2 and "http-token" in refused.stderr
    # A generated token file is private; one others may read is refused.
    made = site.run("http-token", "--show", QIE_HTTP_TOKEN_FILE=str(tmp_path / "token"))
    assert made.returncode == 0 and (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    assert required_token(settings, "0.0.0.0") == made.stdout.strip().splitlines()[-1]
    os.chmod(tmp_path / "token", 0o644)
    with pytest.raises(WebConfigError, match="chmod 600"):
        required_token(settings, "0.0.0.0")
    assert required_token(settings_of(site), "127.0.0.1") is None


def test_with_a_token_every_page_and_api_call_needs_it(site: Folders):
    token = "correct-horse-battery-staple-42"
    app = create_app(settings_of(site, http_listen="0.0.0.0:8765", http_token=token), token=token)
    with TestClient(app, base_url="http://photos.example:8765") as client:
        for path in ("/api/jobs", "/api/jobs/1", "/api/jobs/1/output", "/api/jobs/1/thumbs/output", "/metrics",
                     "/healthz", "/readyz", "/openapi.json", "/api/events"):
            response = client.get(path)
            assert response.status_code == 401, path
        assert client.post("/api/jobs/1/retry").status_code == 401
        page = client.get("/jobs/1", headers={"accept": "text/html"}, follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/jobs/1"
        bearer = {"authorization": f"Bearer {token}"}
        assert client.get("/api/jobs", headers=bearer).status_code == 200
        assert client.get("/api/jobs", headers={"authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
        assert client.get("/metrics", headers=bearer).status_code == 200
        # The login page: a wrong token is refused, the right one opens every page by a cookie.
        login = client.get("/login")
        assert login.status_code == 200 and "No daemon" not in login.text
        csrf = client.cookies["qie_csrf"]
        wrong = client.post("/login", data={"token": "guess", "csrf": csrf, "next": "/failed"}, follow_redirects=False)
        assert wrong.status_code == 401
        right = client.post("/login", data={"token": token, "csrf": csrf, "next": "/failed"}, follow_redirects=False)
        assert right.status_code == 303 and right.headers["location"] == "/failed"
        assert token not in right.headers["set-cookie"]
        assert client.get("/failed").status_code == 200 and client.get("/api/jobs").status_code == 200
        outside = client.post("/login", data={"token": token, "csrf": csrf, "next": "//evil.example/x"},
                              follow_redirects=False)
        assert outside.headers["location"] == "/"
    app.state.ctx.db.close()


def test_cross_site_requests_cannot_change_anything(site: Folders):
    app = create_app(settings_of(site), token=None)
    with TestClient(app, base_url=LOOPBACK) as client:
        broken = job_id(client, "broken")
        # A page elsewhere posting a form to the loopback server: refused by its origin.
        forged = client.post(f"/jobs/{broken}/cancel", data={"csrf": "x"},
                             headers={"origin": "https://evil.example", "sec-fetch-site": "cross-site"})
        assert forged.status_code == 403
        # A browser request from the page itself needs the CSRF token of its cookie.
        client.get("/")
        without = client.post(f"/jobs/{broken}/cancel", data={"csrf": "wrong"}, headers={"origin": LOOPBACK})
        assert without.status_code == 403
        assert client.post(f"/api/jobs/{broken}/cancel", headers={"origin": LOOPBACK}).status_code == 403
        # A name that is not loopback (DNS rebinding) gets nothing at all.
        rebound = client.get("/api/jobs", headers={"host": "attacker.example:8765"})
        assert rebound.status_code == 421
        assert site.job_states()["broken"] == "failed"
    app.state.ctx.db.close()


def test_a_real_server_in_another_process_serves_the_same_pages(site: Folders):
    """``run.py web`` beside the folders and database (no daemon running)."""
    import socket
    import subprocess
    import sys
    import time
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from tests.daemon import ROOT
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "web"], cwd=site.root,
                               env=site.env(QIE_HTTP_LISTEN=f"127.0.0.1:{port}"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/jobs", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.1)
        assert response.status_code == 200 and response.json()["total"] == 4
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=20)
