"""The device never waits for the rest: a drop is queued and shown while a long unit runs, and a
slow disk does not hold up the next stage."""

from __future__ import annotations

import json
import threading
import time

from tests.daemon import Folders, tiny_job


def test_a_drop_is_queued_and_shown_by_status_while_a_long_unit_runs(folders: Folders):
    # Preconditions: every unit takes a minute (a GPU busy with a long sampling run).
    with folders.serve(QIE_FAKE__UNIT_SECONDS="60") as daemon:
        daemon.wait_ready()
        folders.drop("long", tiny_job(seed=1))
        daemon.wait_for(lambda: folders.db_rows("SELECT id FROM jobs WHERE name = 'long' AND stage = 'encode_text'"),
                        what="the long unit running")

        # Action: a new drop while the unit runs.
        folders.drop("newcomer", tiny_job(seed=2))

        # Postconditions: queued, and listed by status, before the running unit has ended.
        daemon.wait_for(lambda: folders.job_states().get("newcomer") == "queued", timeout=50, what="the drop queued")
        listed = {job["name"]: job["state"] for job in json.loads(folders.run("status", "--json").stdout)["jobs"]}
        assert listed == {"long": "running", "newcomer": "queued"}
        assert folders.db_rows("SELECT stage FROM jobs WHERE name = 'long'") == [("encode_text",)]
        daemon.kill()


def test_a_slow_disk_does_not_hold_up_the_next_stage(folders: Folders):
    # The first checkpoint write (prepare's) takes 3 s; the stages after it go on meanwhile.
    folders.drop("slow", tiny_job(seed=3))
    with folders.serve(QIE_FAULTS="checkpoint.write@1=pause:3", QIE_FAKE__UNIT_SECONDS="0.2") as daemon:
        daemon.wait_for(lambda: folders.db_rows("SELECT stage FROM jobs WHERE stage = 'sample'"),
                        what="sampling under way")
        assert folders.db_rows("SELECT COUNT(*) FROM checkpoints WHERE stage = 'prepare'") == [(0,)], \
            "sampling waited for the prepare checkpoint"
        daemon.wait_for(lambda: folders.job_states().get("slow") == "done", what="the job done")
        assert daemon.stop() == 0
    # Once done, every stage's checkpoint is recorded, in the order the stages ran.
    assert [stage for stage, hit, _, error in folders.stage_runs(1)] == [
        "prepare", "encode_text", "encode_latent", "sample", "decode"]


def test_the_engine_is_made_once_when_two_threads_ask_for_it_at_once(tmp_path, monkeypatch):
    # The compute loop and the thread that works ahead both ask for the engine; two engines would
    # import the engine's libraries in two threads at once, which leaves half-initialised modules.
    import processor.daemon as daemon_module
    from config import load_settings

    made = []

    def slow_create_engine(settings, cache):
        made.append(threading.current_thread().name)
        time.sleep(0.3)
        return create_engine(settings, cache)

    create_engine = daemon_module.create_engine
    monkeypatch.setattr(daemon_module, "create_engine", slow_create_engine)
    settings = load_settings(None, engine="fake", http_listen="off",
                             state=tmp_path / "state.db",
                             **{name: tmp_path / name for name in ("inbox", "outbox", "failed", "archive", "work")})
    daemon = daemon_module.Daemon(settings)
    engines = []
    threads = [threading.Thread(target=lambda: engines.append(daemon.engine())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(made) == 1 and len(engines) == 2 and engines[0] is engines[1]
