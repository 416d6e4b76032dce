"""The diffusers engine, on the tiny random model: what a user of the stages can rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import StageParameters
from config.settings import Settings
from stages import checkpoint
from stages.diffusers_engine import DiffusersEngine
from stages.engine import SampleResume, StageInterrupted
from stages.errors import ModelNotFoundError, PermanentError
from stages.model_cache import ModelCache
from stages.tiny_model import LORA_NAME, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "make the sky blue"
NEGATIVE = "blurry, low quality"


def image(seed: int, height: int, width: int) -> np.ndarray:
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def prepared() -> dict:
    """A prepare payload: a non-square image1 and a square reference image."""
    return {"images": [image(0, 64, 80), image(1, 48, 48)]}


def make_engine(tiny_model: Path, cache: ModelCache | None = None) -> DiffusersEngine:
    return DiffusersEngine(Settings(model_path=tiny_model, threads=2), cache or ModelCache())


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> DiffusersEngine:
    return make_engine(tiny_model)


@pytest.fixture(scope="module")
def baseline(engine, prepared) -> torch.Tensor:
    """The image of the default test job: no LoRA, cfg 1, seed 7."""
    return run_job(engine, prepared, params())


@pytest.fixture(scope="module")
def guided(engine, prepared) -> torch.Tensor:
    """The same job with true CFG 2.5 and the negative prompt."""
    return run_job(engine, prepared, params(cfg=2.5))


def params(**overrides) -> StageParameters:
    values = {"lora": None, "steps": 4, "cfg": 1.0, "shift": 3.0}
    values.update(overrides)
    return StageParameters(**values)


def run_job(engine, prepared, p, prompt=PROMPT, negative=NEGATIVE, seed=7, roundtrip=False):
    """prepare -> encode_latent -> encode_text -> sample -> decode, optionally through checkpoints."""
    keep = (lambda payload: checkpoint.decode(checkpoint.encode(payload))) if roundtrip else (lambda x: x)
    prepared = keep(prepared)
    latent = keep(engine.encode_latent(prepared, p))
    text = keep(engine.encode_text(prepared, p, prompt, negative))
    sampled = keep(engine.sample(prepared, latent, text, p, seed, None, None))
    return torch.from_numpy(keep(engine.decode(sampled, p))["image"])


# One-shot equivalence --------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [1.0, 2.5], ids=["cfg1", "true_cfg"])
def test_the_staged_engine_reproduces_diffusers_one_shot_pipeline(tiny_model, engine, prepared, cfg,
                                                                  monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
    from diffusers import QwenImageEditPlusPipeline

    hints = json.loads((tiny_model / "qie_engine.json").read_text())
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", hints["vae_image_area"])
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", hints["condition_image_area"])
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model, local_files_only=True)
    # The engine's scheduler: ModelSamplingAuraFlow's static shift instead of dynamic shifting.
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                      shift=3.0, shift_terminal=None)
    pipe.set_progress_bar_config(disable=True)
    pil = [Image.fromarray(array) for array in prepared["images"]]
    expected = pipe(image=pil, prompt=PROMPT, negative_prompt=NEGATIVE if cfg > 1 else None,
                    true_cfg_scale=cfg, height=64, width=80, num_inference_steps=4,
                    generator=torch.Generator("cpu").manual_seed(7)).images[0]  # what a script would save
    expected = torch.from_numpy(np.asarray(expected))

    staged = run_job(engine, prepared, params(cfg=cfg), negative=NEGATIVE)

    assert staged.dtype == torch.uint8 and staged.shape == (64, 80, 3)
    assert torch.equal(staged, expected), f"max difference {(staged.int() - expected.int()).abs().max().item()}"


# Checkpoints and processes -------------------------------------------------------------------------

def test_every_stage_payload_survives_a_checkpoint_round_trip_exactly(engine, prepared):
    p = params(cfg=2.5, denoise=0.75)
    direct = run_job(engine, prepared, p)
    through_files = run_job(engine, prepared, p, roundtrip=True)
    assert torch.equal(direct, through_files)
    assert direct.dtype == torch.uint8 and direct.shape == (64, 80, 3)


def test_stages_in_separate_processes_give_the_same_image(tiny_model, engine, prepared, tmp_path):
    p = params()
    latent = engine.encode_latent(prepared, p)
    (tmp_path / "prepare.st").write_bytes(checkpoint.encode(prepared))
    (tmp_path / "latent.st").write_bytes(checkpoint.encode(latent))
    script = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from config import StageParameters
from config.settings import Settings
from stages import checkpoint
from stages.diffusers_engine import DiffusersEngine
from stages.model_cache import ModelCache
folder = Path({str(tmp_path)!r})
engine = DiffusersEngine(Settings(model_path=Path({str(tiny_model)!r}), threads=2), ModelCache())
p = StageParameters(**{p.model_dump(mode="json")!r})
prepared = checkpoint.decode((folder / "prepare.st").read_bytes())
latent = checkpoint.decode((folder / "latent.st").read_bytes())
text = engine.encode_text(prepared, p, {PROMPT!r}, {NEGATIVE!r})
sampled = engine.sample(prepared, latent, text, p, 7, None, None)
(folder / "image.st").write_bytes(checkpoint.encode(engine.decode(sampled, p)))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, capture_output=True)
    other_process = torch.from_numpy(checkpoint.decode((tmp_path / "image.st").read_bytes())["image"])
    assert torch.equal(other_process, run_job(engine, prepared, p))


# Sampling --------------------------------------------------------------------------------------

def test_sampling_resumed_after_step_2_is_bit_identical_to_an_uninterrupted_run(engine, prepared):
    p = params(steps=4, cfg=2.5)
    latent = engine.encode_latent(prepared, p)
    text = engine.encode_text(prepared, p, PROMPT, NEGATIVE)
    partials = {}
    full = engine.sample(prepared, latent, text, p, 11, None,
                         lambda k, state: partials.__setitem__(k, checkpoint.encode(state)))
    assert sorted(partials) == [1, 2, 3, 4]

    resumed = engine.sample(prepared, latent, text, p, 11,
                            SampleResume(2, checkpoint.decode(partials[2])), None)
    assert torch.equal(resumed["latents"], full["latents"])
    assert (resumed["height"], resumed["width"]) == (full["height"], full["width"]) == (64, 80)


def test_should_stop_interrupts_between_steps_and_the_run_resumes_from_the_last_step(engine, prepared):
    p = params(steps=4)
    latent = engine.encode_latent(prepared, p)
    text = engine.encode_text(prepared, p, PROMPT, "")
    saved = {}
    with pytest.raises(StageInterrupted):
        engine.sample(prepared, latent, text, p, 3, None, lambda k, s: saved.update(step=k, state=s),
                      should_stop=lambda: saved.get("step") == 3)
    assert saved["step"] == 3
    resumed = engine.sample(prepared, latent, text, p, 3, SampleResume(saved["step"], saved["state"]), None)
    assert torch.equal(resumed["latents"], engine.sample(prepared, latent, text, p, 3, None, None)["latents"])


def test_the_seed_decides_the_noise(engine, prepared, baseline):
    assert torch.equal(run_job(engine, prepared, params(), seed=7), baseline)
    assert not torch.equal(run_job(engine, prepared, params(), seed=8), baseline)


def test_true_cfg_with_a_negative_prompt_differs_from_cfg_1(engine, prepared, baseline, guided):
    assert not torch.equal(baseline, guided)
    text = engine.encode_text(prepared, params(cfg=1.0), PROMPT, NEGATIVE)
    assert text["negative_prompt_embeds"] is None  # no CFG: the negative prompt is not encoded
    assert text["prompt_embeds_mask"] is None  # diffusers' encode_prompt at batch 1, kept faithfully


def test_cfg_norm_strength_0_skips_the_rescale(engine, prepared, guided):
    assert not torch.equal(run_job(engine, prepared, params(cfg=2.5, cfg_norm_strength=0.0)), guided)


def test_denoise_below_1_starts_from_image1(engine, prepared, baseline):
    p = params(denoise=0.5)
    latent = engine.encode_latent(prepared, p)
    assert latent["init_latents"] is not None and latent["init_latents"].shape == (1, 4 * 5, 64)
    assert engine.encode_latent(prepared, params())["init_latents"] is None
    assert not torch.equal(run_job(engine, prepared, p), baseline)


def test_output_size_is_width_height_or_image1_rounded_down_to_16(engine, prepared):
    latent = engine.encode_latent(prepared, params(width=100, height=40))
    assert (latent["width"], latent["height"]) == (96, 32)
    assert [list(s) for s in latent["vae_sizes"]] == [[64, 64], [64, 64]]  # 4096 px area, multiples of 32
    out = run_job(engine, prepared, params(width=100, height=40))
    assert out.shape == (32, 96, 3)


@pytest.mark.parametrize("field,value", [("sampler", "dpmpp_2m"), ("scheduler", "karras")])
def test_unsupported_sampler_or_scheduler_is_a_permanent_error_naming_the_field(engine, prepared, field,
                                                                                 value):
    p = params(**{field: value})
    latent = engine.encode_latent(prepared, p)
    text = engine.encode_text(prepared, p, PROMPT, "")
    with pytest.raises(PermanentError, match=f"'{field}'") as info:
        engine.sample(prepared, latent, text, p, 1, None, None)
    assert "euler" in str(info.value) or "simple" in str(info.value)


def test_raw_latent_reference_mode_is_left_to_the_comfyui_engine(engine, prepared):
    p = params(reference_mode="raw_latent")
    with pytest.raises(PermanentError, match="'reference_mode'"):
        engine.encode_latent(prepared, p)
    with pytest.raises(PermanentError, match="'reference_mode'"):
        engine.encode_text(prepared, p, PROMPT, "")


# LoRA ------------------------------------------------------------------------------------------

def test_the_lora_changes_the_output_and_strength_0_is_no_lora(engine, prepared, baseline):
    none = baseline
    zero = run_job(engine, prepared, params(lora=LORA_NAME, lora_strength=0.0))
    full = run_job(engine, prepared, params(lora=LORA_NAME, lora_strength=1.0))
    assert torch.equal(none, zero)
    assert not torch.equal(zero, full)
    identities = engine.model_identities(params(lora=LORA_NAME, lora_strength=0.5))
    assert LORA_NAME in identities["transformer"] and "strength=0.5" in identities["transformer"]


def test_lora_files_in_comfyui_and_kohya_key_layouts_apply_the_same_weights(tiny_model, prepared, tmp_path):
    from safetensors.torch import load_file, save_file

    bare = load_file(str(tiny_model / "loras" / LORA_NAME))
    kohya = {}
    for key, value in bare.items():
        key = "diffusion_model." + key.replace("lora_A", "lora_down").replace("lora_B", "lora_up")
        kohya[key] = value
        if "lora_down" in key:
            kohya[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(float(value.shape[0]))
    (tmp_path / "loras").mkdir()
    save_file(kohya, str(tmp_path / "loras" / "kohya.safetensors"))
    settings = Settings(model_path=tiny_model, lora_dir=tmp_path / "loras", threads=2)
    other = DiffusersEngine(settings, ModelCache())
    default = make_engine(tiny_model)
    assert torch.equal(run_job(other, prepared, params(lora="kohya.safetensors")),
                       run_job(default, prepared, params(lora=LORA_NAME)))


def test_a_lora_that_matches_no_layer_is_a_permanent_error(tiny_model, prepared, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "loras").mkdir()
    save_file({"unet.down.0.lora_A.weight": torch.zeros(4, 8), "unet.down.0.lora_B.weight": torch.zeros(8, 4)},
              str(tmp_path / "loras" / "sdxl.safetensors"))
    other = DiffusersEngine(Settings(model_path=tiny_model, lora_dir=tmp_path / "loras", threads=2), ModelCache())
    p = params(lora="sdxl.safetensors")
    latent = other.encode_latent(prepared, p)
    text = other.encode_text(prepared, p, PROMPT, "")
    with pytest.raises(PermanentError, match="sdxl.safetensors"):
        other.sample(prepared, latent, text, p, 1, None, None)


def test_a_missing_lora_file_raises_model_not_found_naming_the_path(engine, tiny_model, prepared):
    p = params(lora="nope.safetensors")
    expected = str(tiny_model / "loras" / "nope.safetensors")
    with pytest.raises(ModelNotFoundError, match=expected):
        engine.model_identities(p)
    latent = engine.encode_latent(prepared, params())
    text = engine.encode_text(prepared, params(), PROMPT, "")
    with pytest.raises(ModelNotFoundError, match=expected):
        engine.sample(prepared, latent, text, p, 1, None, None)


def test_a_missing_model_raises_model_not_found_naming_the_path(tmp_path, prepared):
    missing = tmp_path / "no-such-model"
    other = DiffusersEngine(Settings(model_path=missing, threads=2), ModelCache())
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        other.model_identities(params())
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        other.encode_latent(prepared, params())


def test_a_component_without_its_weights_raises_model_not_found_naming_it(tiny_model, tmp_path, prepared):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    other = DiffusersEngine(Settings(model_path=copy, threads=2), ModelCache())
    with pytest.raises(ModelNotFoundError, match=str(copy / "vae")):
        other.encode_latent(prepared, params())


# Models and identities -------------------------------------------------------------------------

def test_each_model_is_loaded_once_across_several_jobs(tiny_model, prepared):
    cache = ModelCache()
    engine = make_engine(tiny_model, cache)
    for seed, prompt in [(1, "a"), (2, "b"), (3, "c")]:
        run_job(engine, prepared, params(lora=LORA_NAME, cfg=2.5), prompt=prompt, seed=seed)
    assert dict(cache.stats.loads) == {"vae": 1, "text_encoder": 1, "transformer": 1}


def test_identities_change_when_model_files_change(tiny_model, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    other = DiffusersEngine(Settings(model_path=copy, threads=2), ModelCache())
    before = other.model_identities(params(lora=LORA_NAME))
    assert set(before) == {"vae", "text_encoder", "transformer"}
    with open(copy / "vae" / "config.json", "a") as handle:
        handle.write("\n")
    after = other.model_identities(params(lora=LORA_NAME))
    assert after["vae"] != before["vae"]
    assert after["transformer"] == before["transformer"]
    assert after["transformer"] != other.model_identities(params(lora=LORA_NAME, lora_strength=0.5))["transformer"]


def test_version_and_device(engine):
    assert engine.name == "diffusers"
    assert engine.version().startswith("diffusers ") and "transformers" in engine.version()
    assert engine.device_name().startswith("cpu")


def test_the_tiny_model_is_deterministic_small_and_marked_as_noise(tiny_model, tmp_path):
    again = build_tiny_model(tmp_path / "tiny", seed=0)
    for name in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", f"loras/{LORA_NAME}", "tokenizer/tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name
    assert sum(f.stat().st_size for f in tiny_model.rglob("*") if f.is_file()) < 20_000_000
    assert "noise" in (tiny_model / "TINY_MODEL_README.txt").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # temp folder renamed away


def test_without_a_model_path_the_tiny_model_is_built_under_work(tmp_path):
    settings = Settings(work=tmp_path / "work", threads=2)
    other = DiffusersEngine(settings, ModelCache())
    identities = other.model_identities(params(lora=LORA_NAME))
    assert (settings.tiny_model_path / "TINY_MODEL_README.txt").is_file()
    assert LORA_NAME in identities["transformer"]


def test_the_largest_seed_ksampler_takes_is_taken(engine, prepared):
    largest = run_job(engine, prepared, params(), seed=2**64 - 1)
    assert largest.shape == (64, 80, 3) and not torch.equal(largest, run_job(engine, prepared, params(), seed=0))


def test_a_float_scaled_image1_is_taken_rounded_to_8_bits(engine, prepared):
    from stages.resize import eight_bit

    floats = prepared["images"][0].astype(np.float32) / np.float32(255.0) + np.float32(0.0013)  # between levels
    as_floats = run_job(engine, {"images": [floats, prepared["images"][1]]}, params())
    as_8_bits = run_job(engine, {"images": [eight_bit(floats), prepared["images"][1]]}, params())
    assert torch.equal(as_floats, as_8_bits)
