"""The ComfyUI engine against a real ComfyUI checkout, on tiny random-weight models.

Runs only when ``QIE_COMFYUI_PATH`` names a ComfyUI checkout and the Python running the tests
can import it (ComfyUI's requirements installed), e.g.::

    QIE_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_comfyui_engine.py

The tiny models are ComfyUI-format files with shrunken sizes (``tests/comfyui_tiny.py`` patches
ComfyUI's hard-coded Qwen-Image sizes; nothing else of ComfyUI is changed). The first part
drives the engine directly; the second runs the real daemon (``run.py serve``) in child
processes with the comfyui engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFYUI = os.environ.get("QIE_COMFYUI_PATH")
if not COMFYUI or not (Path(COMFYUI) / "nodes.py").is_file():
    pytest.skip("ComfyUI integration test: set QIE_COMFYUI_PATH to a ComfyUI checkout (and run with a Python "
                "that has ComfyUI's requirements) to run it", allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from processor.store import read_checkpoint, write_checkpoint  # noqa: E402

from tests import comfyui_tiny  # noqa: E402

comfyui_tiny.install()  # before ComfyUI is imported by the engine

from config import Settings, StageParameters  # noqa: E402
from stages import checkpoint as ckpt  # noqa: E402
from stages.comfyui_engine import ComfyUIEngine, comfyui_report  # noqa: E402
from stages.engine import SampleResume, StageInterrupted  # noqa: E402
from stages.errors import ModelNotFoundError, PermanentError  # noqa: E402
from stages.model_cache import ModelCache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = comfyui_tiny.FILE_NAMES
LORA = NAMES["lora"]


def comfy_settings(**overrides) -> Settings:
    values = dict(engine="comfyui", comfyui_path=Path(COMFYUI), device="cpu", threads=2,
                  vae_name=NAMES["vae"], text_encoder_name=NAMES["text_encoder"],
                  diffusion_model_name=NAMES["diffusion_model"])
    values.update(overrides)
    return Settings(**values)


_BUILT: dict[str, Path] = {}  # one set of tiny models per process, whichever test module asks first


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    """Boot ComfyUI, write the tiny models, and point ComfyUI at them through an extra_model_paths.yaml."""
    if "root" in _BUILT:
        return _BUILT["root"]
    engine = ComfyUIEngine(comfy_settings(), ModelCache())
    root = tmp_path_factory.mktemp("comfy-models")
    comfyui_tiny.build_models(root)
    yaml = root / "extra_model_paths.yaml"
    yaml.write_text("qie_test:\n  base_path: .\n  vae: vae/\n  text_encoders: text_encoders/\n"
                    "  diffusion_models: diffusion_models/\n  loras: loras/\n")
    engine.comfy.add_extra_model_paths(yaml)
    _BUILT["root"] = root
    return root


@pytest.fixture(scope="module")
def engine(models) -> ComfyUIEngine:
    return ComfyUIEngine(comfy_settings(), ModelCache())


def image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


PREPARED = {"images": [image(48, 64, 1)]}
PARAMS = StageParameters(lora=LORA)


@pytest.fixture(scope="module")
def encoded(engine) -> dict:
    """The reference job's encode_latent and encode_text payloads (the text encode is the slow part)."""
    return {"latent": engine.encode_latent(PREPARED, PARAMS),
            "text": engine.encode_text(PREPARED, PARAMS, "make the sky purple", ""),  # cfg 1: no negative
            "text_cfg": engine.encode_text(PREPARED, PARAMS.model_copy(update={"cfg": 2.5}), "make the sky purple",
                                           "blurry")}


def roundtrip(payload, tmp_path: Path, name: str):
    path = tmp_path / f"{name}.safetensors"
    return read_checkpoint(path, write_checkpoint(path, payload)[0])


# The engine ----------------------------------------------------------------------------------------

def test_version_names_comfyui_and_its_commit(engine):
    version = engine.version()
    assert version.startswith("ComfyUI 0.") and "torch" in version
    assert engine.device_name().startswith("cpu")


def test_every_stage_runs_and_checkpointed_payloads_give_the_same_image(engine, encoded, tmp_path):
    latent, text = encoded["latent"], encoded["text"]
    assert latent["samples"].shape == (1, 16, 1, 6, 8)
    positive = text["positive"]
    assert positive[0][0].shape[0] == 1 and positive[0][0].shape[2] == comfyui_tiny.TEXT_HIDDEN
    assert positive[0][1]["pooled_output"] is None
    assert len(positive[0][1]["reference_latents"]) == 1
    sampled = engine.sample(PREPARED, latent, text, PARAMS, 7, None, None)
    decoded = engine.decode(sampled, PARAMS)
    assert decoded["image"].shape == (48, 64, 3) and decoded["image"].dtype == np.uint8  # SaveImage's pixels
    for tensor in (latent["samples"], positive[0][0], sampled["samples"]):
        assert not tensor.is_inference() and tensor.device.type == "cpu"  # plain payload tensors

    # The same chain with every payload stored and read back, as the runner does.
    latent2, text2 = roundtrip(latent, tmp_path, "latent"), roundtrip(text, tmp_path, "text")
    sampled2 = roundtrip(engine.sample(PREPARED, latent2, text2, PARAMS, 7, None, None), tmp_path, "sample")
    assert torch.equal(sampled2["samples"], sampled["samples"])
    assert np.array_equal(engine.decode(sampled2, PARAMS)["image"], decoded["image"])


@pytest.mark.parametrize("overrides", [{}, {"cfg": 2.5, "denoise": 0.75, "steps": 3}, {"sampler": "heun"}],
                         ids=["reference", "true-cfg-denoise", "heun"])
def test_sampling_gives_exactly_what_ksampler_gives(engine, encoded, overrides):
    params = PARAMS.model_copy(update=overrides)
    text = encoded["text"] if params.cfg == 1 else encoded["text_cfg"]
    ours = engine.sample(PREPARED, encoded["latent"], text, params, 11, None, None)
    full = encoded["text_cfg"]  # KSampler gets an encoded negative even where the engine skips it (cfg 1)
    with torch.inference_mode():
        theirs = engine.comfy.node("KSampler", model=engine._transformer(params), seed=11, steps=params.steps,
                                   cfg=params.cfg, sampler_name=params.sampler, scheduler=params.scheduler,
                                   positive=full["positive"], negative=full["negative"],
                                   latent_image=encoded["latent"], denoise=params.denoise)
    assert torch.equal(ours["samples"], theirs["samples"])


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sampling_resumed_from_any_partial_gives_the_same_bytes(engine, encoded, tmp_path, sampler):
    params = PARAMS.model_copy(update={"steps": 5, "sampler": sampler})
    partials = {}
    full = engine.sample(PREPARED, encoded["latent"], encoded["text"], params, 3, None,
                         lambda step, state: partials.__setitem__(step, state))
    assert sorted(partials) == [1, 2, 3, 4, 5]
    for step in (1, 3, 4):
        state = roundtrip(partials[step], tmp_path, f"partial{step}")
        resumed = engine.sample(PREPARED, encoded["latent"], encoded["text"], params, 3,
                                SampleResume(step, state), None)
        assert torch.equal(resumed["samples"], full["samples"]), f"resumed after step {step}"


def test_should_stop_interrupts_between_steps_and_the_run_continues_from_there(engine, encoded):
    params = PARAMS.model_copy(update={"steps": 4})
    full = engine.sample(PREPARED, encoded["latent"], encoded["text"], params, 5, None, None)
    partials = {}
    with pytest.raises(StageInterrupted):
        engine.sample(PREPARED, encoded["latent"], encoded["text"], params, 5, None,
                      lambda step, state: partials.__setitem__(step, state), should_stop=lambda: len(partials) >= 2)
    assert sorted(partials) == [1, 2]
    resumed = engine.sample(PREPARED, encoded["latent"], encoded["text"], params, 5, SampleResume(2, partials[2]), None)
    assert torch.equal(resumed["samples"], full["samples"])


def test_a_sampler_that_cannot_resume_starts_again_and_still_matches(engine, encoded):
    params = PARAMS.model_copy(update={"sampler": "dpmpp_2m", "steps": 3})
    calls = []
    full = engine.sample(PREPARED, encoded["latent"], encoded["text"], params, 5, None, lambda *a: calls.append(a))
    assert calls == []  # no partials: its state is more than the latent
    bogus = SampleResume(1, {"x": torch.zeros_like(full["samples"]), "steps_total": 3})
    again = engine.sample(PREPARED, encoded["latent"], encoded["text"], params, 5, bogus, None)
    assert torch.equal(again["samples"], full["samples"])


def test_unknown_sampler_is_a_permanent_error(engine, encoded):
    with pytest.raises(PermanentError, match="unknown sampler"):
        engine.sample(PREPARED, encoded["latent"], encoded["text"], PARAMS.model_copy(update={"sampler": "eulr"}),
                      1, None, None)


def test_the_lora_and_its_strength_change_the_output(engine, encoded):
    def run(**update):
        params = PARAMS.model_copy(update=update)
        return engine.sample(PREPARED, encoded["latent"], encoded["text"], params, 9, None, None)["samples"]

    with_lora, half, without = run(), run(lora_strength=0.5), run(lora=None)
    assert not torch.equal(with_lora, without)
    assert not torch.equal(with_lora, half) and not torch.equal(half, without)
    assert not torch.equal(run(shift=1.0), with_lora)


def test_custom_output_size_starts_from_an_empty_latent(engine, encoded):
    params = PARAMS.model_copy(update={"width": 96, "height": 64})
    latent = engine.encode_latent(PREPARED, params)
    assert latent["samples"].shape == (1, 16, 8, 12) and not latent["samples"].any()  # EmptySD3LatentImage
    sampled = engine.sample(PREPARED, latent, encoded["text"], params, 2, None, None)
    assert engine.decode(sampled, params)["image"].shape == (64, 96, 3)


def test_raw_latent_references_are_each_image_at_its_own_size(engine):
    prepared = {"images": [image(48, 64, 1), image(40, 24, 2)]}
    params = PARAMS.model_copy(update={"reference_mode": "raw_latent", "cfg": 2.0})
    text = engine.encode_text(prepared, params, "put the cat in the garden", "")
    for conditioning in (text["positive"], text["negative"]):
        references = conditioning[0][1]["reference_latents"]
        assert [tuple(r.shape) for r in references] == [(1, 16, 1, 6, 8), (1, 16, 1, 5, 3)]
    latent = engine.encode_latent(prepared, params)
    sampled = engine.sample(prepared, latent, text, params, 4, None, None)
    assert engine.decode(sampled, params)["image"].shape == (48, 64, 3)


def test_each_model_is_loaded_once_across_several_jobs(models):
    cache = ModelCache()
    engine = ComfyUIEngine(comfy_settings(), cache)
    prepared = {"images": [image(32, 32, 5)]}
    for job, prompt in enumerate(["one", "two"]):
        latent = engine.encode_latent(prepared, PARAMS)
        text = engine.encode_text(prepared, PARAMS, prompt, "")
        for seed in (job, job + 10):
            engine.decode(engine.sample(prepared, latent, text, PARAMS, seed, None, None), PARAMS)
    assert cache.stats.loads == {"vae": 1, "text_encoder": 1, "transformer": 1}
    assert cache.resident_bytes() > 0
    # A different LoRA strength, shift or CFGNorm strength is a differently patched model.
    engine.sample(prepared, latent, text, PARAMS.model_copy(update={"lora_strength": 0.5}), 1, None, None)
    engine.sample(prepared, latent, text, PARAMS.model_copy(update={"cfg_norm_strength": 0.5}), 1, None, None)
    assert cache.stats.loads == {"vae": 1, "text_encoder": 1, "transformer": 3}


def test_model_identities_change_with_the_lora_and_name_the_files(engine):
    identities = engine.model_identities(PARAMS)
    assert identities["vae"].startswith(NAMES["vae"])
    assert LORA in identities["transformer"] and "strength=1.0" in identities["transformer"]
    assert engine.model_identities(PARAMS.model_copy(update={"lora": None}))["transformer"].endswith("lora none")


def test_a_missing_model_file_names_the_folders_searched(models, engine):
    broken = ComfyUIEngine(comfy_settings(vae_name="missing_vae.safetensors"), ModelCache())
    with pytest.raises(ModelNotFoundError) as info:
        broken.model_identities(PARAMS)
    message = str(info.value)
    assert "missing_vae.safetensors" in message and str(models / "vae") in message
    assert str(Path(COMFYUI).resolve() / "models" / "vae") in message
    with pytest.raises(ModelNotFoundError, match="no_such_lora.*searched:.*loras"):
        engine.model_identities(PARAMS.model_copy(update={"lora": "no_such_lora.safetensors"}))


def test_a_folder_that_is_not_a_comfyui_checkout_is_refused(engine, tmp_path):
    with pytest.raises(PermanentError, match="not a ComfyUI checkout"):
        ComfyUIEngine(comfy_settings(comfyui_path=tmp_path), ModelCache())
    with pytest.raises(PermanentError, match="does not exist"):
        ComfyUIEngine(comfy_settings(comfyui_path=tmp_path / "nowhere"), ModelCache())
    old = tmp_path / "old"
    for name in ("nodes.py", "folder_paths.py", "comfy/cli_args.py", "comfy/model_management.py"):
        (old / name).parent.mkdir(parents=True, exist_ok=True)
        (old / name).write_text("")
    (old / "comfyui_version.py").write_text('__version__ = "0.3.40"\n')
    with pytest.raises(PermanentError, match="0.3.40 .* is too old"):
        ComfyUIEngine(comfy_settings(comfyui_path=old), ModelCache())
    (old / "comfyui_version.py").write_text('__version__ = "0.3.64"\n')
    with pytest.raises(PermanentError, match="already loaded"):  # one checkout per process
        ComfyUIEngine(comfy_settings(comfyui_path=old), ModelCache())


def test_the_doctor_report_lists_version_and_each_model_file(models):
    report = comfyui_report(comfy_settings(defaults=StageParameters(lora=LORA)))
    assert report["ok"] and report["importable"] and report["version"].startswith("0.")
    assert report["models"]["vae"]["found"] and report["models"]["vae"]["path"] == str(models / "vae" / NAMES["vae"])
    missing = comfyui_report(comfy_settings(text_encoder_name="absent.safetensors"))
    assert not missing["ok"] and not missing["models"]["text_encoder"]["found"]
    assert str(models / "text_encoders") in missing["models"]["text_encoder"]["searched"]
    assert "absent.safetensors" in missing["summary"]
    broken = comfyui_report(comfy_settings(comfyui_path=Path("/nonexistent/ComfyUI")))
    assert not broken["ok"] and not broken["importable"] and "does not exist" in broken["error"]


# The daemon ----------------------------------------------------------------------------------------

TINY_RUNNER = ROOT / "tests" / "comfyui_tiny.py"


def comfy_env(folders, models: Path, **extra: str) -> dict[str, str]:
    return folders.env(QIE_ENGINE="comfyui", QIE_COMFYUI_PATH=str(Path(COMFYUI).resolve()), QIE_DEVICE="cpu",
                       QIE_VAE_NAME=NAMES["vae"], QIE_TEXT_ENCODER_NAME=NAMES["text_encoder"],
                       QIE_DIFFUSION_MODEL_NAME=NAMES["diffusion_model"], QIE_DEFAULTS__LORA=LORA,
                       COMFYUI_TINY_MODELS=str(models), QIE_THREADS="2", **extra)  # as comfy_settings


def serve(folders, models: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``run.py serve`` with the tiny ComfyUI patches, in a child process."""
    return subprocess.run([sys.executable, str(TINY_RUNNER), str(ROOT / "run.py"), "serve", *args],
                          env=comfy_env(folders, models, **env), cwd=folders.root, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def daemon_folders(tmp_path):
    from tests.daemon import Folders
    return lambda name: Folders(tmp_path / name, tmp_path / "no-diffusers-model")


def test_daemon_job_killed_during_sample_resumes_to_the_same_bytes(models, daemon_folders):
    from tests.daemon import tiny_job

    job = tiny_job(seed=5, steps=6)
    reference = daemon_folders("reference")
    reference.drop("edit", job)
    result = serve(reference, models, "--once")
    assert result.returncode == 0, result.stderr[-4000:]
    expected = (reference.outbox / "edit.png").read_bytes()

    folders = daemon_folders("killed")
    folders.drop("edit", job)
    # SIGKILL right after step 4; the partial of step 3 is durable by then (the pause lets the
    # writer store it), step 4's may be.
    killed = serve(folders, models, "--once", QIE_FAULTS="stage.sample.step3=pause:1,stage.sample.step4")
    assert killed.returncode == -9, killed.stderr[-4000:]
    assert folders.job_states() == {"edit": "running"}
    assert not (folders.outbox / "edit.png").exists()

    result = serve(folders, models, "--once")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (folders.outbox / "edit.png").read_bytes() == expected
    manifest = json.loads((folders.outbox / "edit.json").read_text())
    assert manifest["engine"]["name"] == "comfyui" and manifest["engine"]["version"].startswith("ComfyUI ")
    assert folders.db_rows("SELECT state, crashes FROM jobs") == [("done", 1)]
    runs = folders.db_rows("SELECT stage, resumed_from_step FROM stage_runs WHERE error IS NULL "
                           "AND stage = 'sample' ORDER BY id")
    assert runs[-1] in (("sample", 3), ("sample", 4))


def test_daemon_loads_each_model_once_for_several_jobs(models, daemon_folders):
    from tests.daemon import tiny_job

    folders = daemon_folders("batch")
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        folders.drop(name, tiny_job(seed=seed, prompt=f"edit {name}"))
    result = serve(folders, models, "--once")
    assert result.returncode == 0, result.stderr[-4000:]
    assert folders.job_states() == {"a": "done", "b": "done", "c": "done"}
    assert sorted(p.name for p in folders.outbox.iterdir()) == ["a.json", "a.png", "b.json", "b.png", "c.json", "c.png"]
    log = result.stdout + result.stderr
    for role in ("vae", "text_encoder", "transformer"):
        assert log.count(f"loaded {role} in") == 1, role


# ComfyUI's own options and custom nodes ------------------------------------------------------------

def test_comfyui_args_are_read_by_comfyui_s_own_parser(engine):
    import comfy.cli_args as cli

    from stages.comfyui_nodes import BEFORE_TORCH_OPTIONS, SERVER_ONLY_OPTIONS, MappingError, user_arguments

    options = {action.dest for action in cli.parser._actions}
    assert SERVER_ONLY_OPTIONS | set(BEFORE_TORCH_OPTIONS) <= options  # every name in the tables is ComfyUI's
    given = user_arguments(cli.parser, ["--fast", "--use-sage-attention", "--reserve-vram", "1.5", "--port", "9"])
    assert given == {"fast": [], "use_sage_attention": True, "reserve_vram": 1.5, "port": 9}
    assert user_arguments(cli.parser, ["--fast", "fp16_accumulation"]) == {"fast": [cli.PerformanceFeature("fp16_accumulation")]}
    for flags, message in ((["--no-such-option"], "no option --no-such-option"),
                           (["--reserve-vram", "lots"], "invalid float value"),
                           (["--cuda-device", "1"], 'device = "cuda:N"')):
        with pytest.raises(MappingError, match=message):
            user_arguments(cli.parser, flags)


def doctor(folders, models: Path, **env: str) -> dict:
    result = subprocess.run([sys.executable, str(TINY_RUNNER), str(ROOT / "run.py"), "doctor", "--json"],
                            env=comfy_env(folders, models, **env), cwd=folders.root, capture_output=True, text=True,
                            timeout=600)
    return json.loads(result.stdout)


def test_custom_nodes_load_only_when_asked_and_comfyui_args_reach_comfyui(models, daemon_folders, tmp_path):
    pack = tmp_path / "packs" / "custom_nodes" / "qie_test_pack"
    pack.mkdir(parents=True)
    (pack / "__init__.py").write_text("import os, pathlib\n"
                                      "pathlib.Path(os.environ['QIE_TEST_PACK_MARKER']).write_text('loaded')\n"
                                      "NODE_CLASS_MAPPINGS = {}\n")
    paths = tmp_path / "packs.yaml"
    paths.write_text(f"packs:\n  base_path: {tmp_path / 'packs'}\n  custom_nodes: custom_nodes/\n")
    marker = tmp_path / "marker"
    env = {"QIE_COMFYUI_EXTRA_MODEL_PATHS": json.dumps([str(paths)]), "QIE_TEST_PACK_MARKER": str(marker)}

    off = doctor(daemon_folders("off"), models, **env)
    assert next(c for c in off["checks"] if c["check"] == "comfyui")["ok"] and not marker.exists()

    on = doctor(daemon_folders("on"), models, QIE_COMFYUI_CUSTOM_NODES="true",
                QIE_COMFYUI_ARGS='["--disable-metadata", "--fast"]', **env)
    assert next(c for c in on["checks"] if c["check"] == "comfyui")["ok"] and marker.read_text() == "loaded"

    refused = doctor(daemon_folders("refused"), models, QIE_COMFYUI_ARGS='["--no-such-option"]')
    comfyui = next(c for c in refused["checks"] if c["check"] == "comfyui")
    assert not comfyui["ok"] and "no option --no-such-option" in comfyui["detail"]


def test_with_disable_metadata_the_png_carries_no_graph(models, daemon_folders):
    from tests.daemon import tiny_job

    folders = daemon_folders("no-metadata")
    folders.drop("edit", tiny_job(seed=2))
    result = serve(folders, models, "--once", QIE_COMFYUI_ARGS='["--disable-metadata"]')
    assert result.returncode == 0, result.stderr[-4000:]
    from PIL import Image
    with Image.open(folders.outbox / "edit.png") as image:
        assert "prompt" not in image.text and "workflow" not in image.text and "parameters" in image.text


def test_a_job_naming_a_missing_lora_is_a_permanent_failure(models, daemon_folders):
    from tests.daemon import tiny_job

    folders = daemon_folders("missing-lora")
    folders.drop("edit", tiny_job(seed=2, lora="not-there.safetensors"))
    result = serve(folders, models, "--once")
    assert result.returncode == 0, result.stderr[-4000:]
    assert folders.db_rows("SELECT state, error_kind FROM jobs") == [("failed", "permanent")]
    report = json.loads((folders.failed / "edit.error.json").read_text())
    assert report["kind"] == "permanent" and "not-there.safetensors" in report["error"] and "gave up" not in report["error"]
