"""The fake engine that the daemon's own tests run on: deterministic, resumable, no torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from config import StageParameters, load_settings
from stages import ModelCache, SampleResume, StageInterrupted, create_engine
from stages.checkpoint import decode, encode

PREPARED = {"images": [np.random.RandomState(0).randint(0, 256, (48, 64, 3), dtype=np.uint8)]}


@pytest.fixture
def engine(tmp_path):
    return create_engine(load_settings(None, engine="fake", work=tmp_path / "work"), ModelCache())


def run(engine, params, seed=1, resume=None, on_step=None, should_stop=None):
    latent = engine.encode_latent(PREPARED, params)
    text = engine.encode_text(PREPARED, params, "p", "")
    sampled = engine.sample(PREPARED, latent, text, params, seed, resume, on_step, should_stop)
    return engine.decode(sampled, params)["image"]


def test_the_same_job_gives_the_same_bytes_and_the_output_is_the_prepared_image(engine):
    params = StageParameters(steps=5)
    first, second = run(engine, params), run(engine, params)
    assert first.dtype == np.uint8 and np.array_equal(first, second)
    assert np.array_equal(first, PREPARED["images"][0])  # identity-like: the edit keeps the picture


def test_a_sampling_run_stopped_and_resumed_from_any_step_gives_the_same_result(engine):
    params = StageParameters(steps=5)
    states = {}
    full = engine.sample(PREPARED, engine.encode_latent(PREPARED, params), {}, params, 3, None,
                         lambda k, state: states.update({k: decode(encode(state))}))
    for step in range(1, 5):
        resumed = engine.sample(PREPARED, engine.encode_latent(PREPARED, params), {}, params, 3,
                                SampleResume(step, states[step]), None)
        assert np.array_equal(resumed["x"], full["x"])
    with pytest.raises(StageInterrupted):
        engine.sample(PREPARED, engine.encode_latent(PREPARED, params), {}, params, 3, None, None, lambda: True)


def test_its_models_go_through_the_cache_with_their_configured_sizes(tmp_path):
    cache = ModelCache()
    engine = create_engine(load_settings(None, engine="fake", work=tmp_path, fake={"transformer_bytes": 12345}), cache)
    run(engine, StageParameters(steps=1))
    run(engine, StageParameters(steps=1))
    assert dict(cache.stats.loads) == {"vae": 1, "text_encoder": 1, "transformer": 1}
    assert cache.sizes()["transformer"] == 12345


def test_a_job_on_the_fake_engine_runs_through_the_daemon_without_importing_torch(folders):
    from tests.daemon import tiny_job
    folders.drop("notorch", tiny_job())
    script = ("import sys, runpy; sys.argv = ['run.py', 'serve', '--once']; "
              "code = 0\ntry:\n    runpy.run_path('run.py', run_name='__main__')\nexcept SystemExit as exit:\n"
              "    code = exit.code\nprint('torch' in sys.modules, 'diffusers' in sys.modules); sys.exit(code)")
    from tests.daemon import ROOT
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=folders.env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False"
    assert (folders.outbox / "notorch.png").exists()
