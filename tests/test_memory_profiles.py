"""Memory profiles of the diffusers engine: which one ``auto`` picks, what each holds on the
device, which change the checkpoints, and that every one runs a job through the daemon.

On the CPU the "device" is host memory: offloading moves weights from the CPU to the CPU there,
which exercises diffusers' block-level group offloading hooks but not its CUDA streams (they
need a GPU; docs/performance.md says what was measured where).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch

from config import StageParameters
from config.settings import ConfigurationError, Settings, load_settings
from stages.diffusers_engine import DiffusersEngine, profile_choice
from stages.errors import PermanentError
from stages.memory_profiles import AUTO_ORDER, GiB, PROFILES, ModelSizes, choose_profile
from stages.model_cache import ModelCache
from stages.placement import device_footprint, module_bytes
from stages.tiny_model import LORA_NAME, write_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from batch import run_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "make the sky blue"
# Qwen-Image-Edit-2509 in bfloat16: the diffusion model 40.9 GB, Qwen2.5-VL-7B 16.6 GB, the VAE 0.25 GB.
REAL = ModelSizes(vae=254_000_000, text_encoder=16_600_000_000, transformer=40_900_000_000)
QUANTIZED = ("fp8", "gguf", "torchao")
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install 'qie-hotfolder[torchao]')")


def params(**overrides: Any) -> StageParameters:
    return StageParameters(**{"lora": None, "steps": 4, "cfg": 2.5, **overrides})


@pytest.fixture(scope="module")
def gguf_file(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny diffusion model as a Q8_0 GGUF file, keyed as ComfyUI's files are."""
    return write_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf", "Q8_0",
                      prefix="model.diffusion_model.")


def engine_for(tiny_model: Path, profile: str, **settings: Any) -> DiffusersEngine:
    return DiffusersEngine(Settings(model_path=tiny_model, threads=2, memory_profile=profile, **settings), ModelCache())


# auto: a pure function of free memory and model sizes -------------------------------------------

@pytest.mark.parametrize("free_gib,expected", [(80, "full"), (24, "fp8-offload-text"), (16, "fp8-offload"),
                                               (8, "fp8-offload")])
def test_auto_picks_the_best_profile_that_fits_the_free_memory(free_gib, expected):
    choice = choose_profile("cuda", free_gib * GiB, REAL)
    assert choice.profile.name == expected
    assert choice.peak <= free_gib * GiB
    assert "fits" in choice.reason
    better = AUTO_ORDER[:AUTO_ORDER.index(expected)]
    assert all(name in choice.reason for name in better)  # it says why the better ones were passed over


def test_auto_is_full_on_the_cpu_and_gguf_when_a_gguf_file_is_configured():
    assert choose_profile("cpu", None, REAL).profile.name == "full"
    assert choose_profile("cuda", 80 * GiB, REAL, gguf_configured=True).profile.name == "gguf"


def test_when_nothing_fits_auto_tries_the_smallest_profile_and_says_so():
    choice = choose_profile("cuda", 2 * GiB, REAL, host_free_bytes=8 * GiB)
    assert choice.profile.name == AUTO_ORDER[-1]
    assert "nothing fits" in choice.reason


def test_auto_reads_the_free_memory_of_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * GiB, 24 * GiB))
    choice = profile_choice(Settings(memory_profile="auto"), torch.device("cuda"), REAL)
    assert choice.profile.name == "fp8-offload-text"
    assert profile_choice(Settings(memory_profile="fp8"), torch.device("cuda"), REAL).reason == "set by memory_profile"


def test_the_settings_offer_every_profile_and_the_gguf_profile_needs_its_file():
    offered = set(get_args(Settings.model_fields["memory_profile"].annotation))
    assert offered == set(PROFILES) | {"auto"}
    with pytest.raises(ConfigurationError, match="gguf_file"):
        load_settings(None, memory_profile="gguf")


# What a profile holds, and the model cache's budget ---------------------------------------------

def test_the_cache_makes_room_for_a_model_before_loading_it():
    cache = ModelCache(budget_bytes=100)
    cache.get("a", lambda: np.zeros(60, dtype=np.uint8), "text_encoder", expected_bytes=60)
    seen = []
    cache.get("b", lambda: seen.append(cache.loaded()) or np.zeros(60, dtype=np.uint8), "transformer",
              expected_bytes=60)
    assert seen == [[]]  # the text encoder was gone before the diffusion model was loaded
    assert cache.loaded() == ["transformer"]


def test_an_offloaded_model_is_budgeted_for_what_lies_outside_its_blocks_and_two_blocks():
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(100, 16)                               # 6400 bytes
    model.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16, bias=False) for _ in range(10))  # 1024 each
    assert device_footprint(model, offload=False) == 6400 + 10 * 1024
    assert device_footprint(model, offload=True) == 6400 + 2 * 1024


def test_the_cache_holds_what_each_profile_really_keeps_on_the_device(tiny_model):
    held = {}
    for profile in ("full", "fp8", "fp8-offload"):
        engine = engine_for(tiny_model, profile)
        share = 8 / torch.finfo(engine.dtype).bits  # float8 against the compute dtype
        transformer = engine._transformer(params())
        bundle = engine._text_encoder(params())
        held[profile] = engine.cache.sizes()
        estimate = engine.model_bytes(params())
        if profile != "fp8-offload":  # resident: every parameter, measured; the estimate from the files agrees
            assert held[profile]["transformer"] == module_bytes(transformer)
            assert held[profile]["text_encoder"] == module_bytes(bundle.model)
            for role in ("transformer", "text_encoder"):
                assert abs(estimate[role] - held[profile][role]) <= 0.25 * held[profile][role], (profile, role)
    # float8 storage: a quarter of float32 (the CPU's compute dtype), half of bfloat16; norms kept.
    assert held["fp8"]["transformer"] < (share + 0.05) * held["full"]["transformer"]
    assert held["fp8"]["text_encoder"] < (share + 0.15) * held["full"]["text_encoder"]
    assert held["fp8-offload"]["text_encoder"] < held["fp8"]["text_encoder"]


# Fingerprints ------------------------------------------------------------------------------------

def test_profiles_that_change_the_numbers_change_the_identities_and_offloading_does_not(tiny_model, gguf_file):
    p = params(lora=LORA_NAME)
    full = engine_for(tiny_model, "full").model_identities(p)
    same_as_full = {"offload": (), "fp8": ("transformer", "text_encoder"),
                    "fp8-offload-text": ("transformer", "text_encoder", "vae"),
                    "fp8-offload": ("transformer", "text_encoder", "vae"),
                    "gguf": ("transformer", "text_encoder", "vae"),
                    "torchao": ("transformer", "text_encoder", "vae")}
    for profile, changed in same_as_full.items():
        identities = engine_for(tiny_model, profile, gguf_file=gguf_file).model_identities(p)
        assert {role for role in full if identities[role] != full[role]} == set(changed), profile
    assert "lora" in engine_for(tiny_model, "gguf", gguf_file=gguf_file).model_identities(p)["transformer"]
    untiled = engine_for(tiny_model, "fp8-offload", vae_tiling=False).model_identities(p)
    assert untiled["vae"] == full["vae"]


def test_a_changed_gguf_file_changes_the_diffusion_models_identity(tiny_model, gguf_file, tmp_path):
    other = write_gguf(tiny_model, tmp_path / "tiny-Q4_0.gguf", "Q4_0")
    first = engine_for(tiny_model, "gguf", gguf_file=gguf_file).model_identities(params())["transformer"]
    second = engine_for(tiny_model, "gguf", gguf_file=other).model_identities(params())["transformer"]
    assert first != second and "tiny-Q4_0.gguf" in second


# Results ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared() -> dict:
    return {"images": [(np.random.RandomState(0).rand(64, 80, 3) * 255).astype(np.uint8)]}


@pytest.fixture(scope="module")
def full_run(tiny_model, prepared) -> dict:
    """full's encodings and sampled latents (seeds 7 and 8)."""
    engine = engine_for(tiny_model, "full")
    latent = engine.encode_latent(prepared, params())
    text = engine.encode_text(prepared, params(), PROMPT, "blurry")
    return {"latent": latent, "seed7": engine.sample(prepared, latent, text, params(), 7, None, None)["latents"],
            "seed8": engine.sample(prepared, latent, text, params(), 8, None, None)["latents"]}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("profile", QUANTIZED)
def test_quantized_profiles_sample_close_to_full(tiny_model, gguf_file, prepared, full_run, profile):
    """float8 e4m3 keeps 3 mantissa bits: each weight is within 2^-4 (6%) of its value, about 3.6%
    on average, and so is each layer's output. The sampled latents may be off by twice the worst
    case, 2^-3 (12.5%), relative: they come out 2.2% off with float8 and under 1% with GGUF Q8_0
    and torchao int8 (8 bits a weight), while a seed change moves them by about 140%."""
    if profile == "torchao" and not HAS_TORCHAO:
        pytest.skip("torchao is not installed")
    engine = engine_for(tiny_model, profile, gguf_file=gguf_file)
    text = engine.encode_text(prepared, params(), PROMPT, "blurry")
    latents = engine.sample(prepared, full_run["latent"], text, params(), 7, None, None)["latents"]
    assert relative_error(latents, full_run["seed7"]) <= 2 ** -3
    assert relative_error(full_run["seed8"], full_run["seed7"]) > 1.0


def test_a_gguf_file_without_comfyuis_prefix_and_with_4_bit_weights_loads_and_takes_a_lora(tiny_model, prepared,
                                                                                           full_run, tmp_path):
    gguf = write_gguf(tiny_model, tmp_path / "tiny-Q4_0.gguf", "Q4_0")
    engine = engine_for(tiny_model, "gguf", gguf_file=gguf)
    text = engine.encode_text(prepared, params(), PROMPT, "blurry")
    plain = engine.sample(prepared, full_run["latent"], text, params(), 7, None, None)["latents"]
    with_lora = engine.sample(prepared, full_run["latent"], text, params(lora=LORA_NAME), 7, None, None)["latents"]
    assert torch.isfinite(plain).all() and plain.shape == full_run["seed7"].shape
    assert relative_error(plain, full_run["seed7"]) <= 0.5  # 4 bits a weight: near, not close
    assert not torch.equal(plain, with_lora)  # the LoRA stays beside the quantized weights and acts


def test_a_file_that_is_not_gguf_is_a_permanent_error_naming_it(tiny_model, prepared, full_run, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    engine = engine_for(tiny_model, "gguf", gguf_file=bad)
    text = {"prompt_embeds": torch.zeros(1, 4, 32)}  # not reached: loading the diffusion model fails first
    with pytest.raises(PermanentError, match="broken.gguf"):
        engine.sample(prepared, full_run["latent"], text, params(), 7, None, None)


def test_vae_tiling_decodes_in_tiles_deterministically_and_differently(tiny_model, prepared, full_run):
    sampled = {"latents": full_run["seed7"], "height": 64, "width": 80}
    tiled = engine_for(tiny_model, "full", vae_tiling=True)
    plain = engine_for(tiny_model, "full").decode(sampled, params())["image"]
    once = tiled.decode(sampled, params())["image"]
    again = tiled.decode(sampled, params())["image"]
    assert tiled._vae(params()).use_tiling
    assert np.array_equal(once, again) and once.shape == plain.shape == (64, 80, 3)
    assert not np.array_equal(once, plain)


# Through the daemon ------------------------------------------------------------------------------

def pixels(png: bytes) -> np.ndarray:
    from io import BytesIO
    from PIL import Image
    return np.asarray(Image.open(BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_every_profile_runs_a_job_through_the_daemon(tiny_model, gguf_file, tmp_path):
    """One job through an in-process daemon per profile, twice for the quantized ones (the models
    loaded afresh each time). Offloading publishes full's bytes; float8, GGUF and torchao publish
    the same bytes twice; float8 without VAE tiling is within 2 levels of 255 of full's image on
    average (0.7 measured: the 2% latent error of float8 weights, decoded)."""
    runs = {profile: 2 if profile in QUANTIZED else 1 for profile in PROFILES}
    if not HAS_TORCHAO:
        runs.pop("torchao")
    published: dict[str, list[bytes]] = {}
    for profile, count in runs.items():
        for i in range(count):
            root = tmp_path / f"{profile}-{i}"
            result = run_batch(root, tiny_model, 1, memory_profile=profile, gguf_file=gguf_file)
            assert result.published == 1, (profile, [p.read_text() for p in (root / "failed").glob("*.json")])
            published.setdefault(profile, []).append((root / "outbox" / "job-0000.png").read_bytes())

    assert len({pixels(images[0]).shape for images in published.values()}) == 1
    assert published["offload"][0] == published["full"][0]
    for profile in QUANTIZED:
        if profile in published:
            assert published[profile][0] == published[profile][1], f"{profile} is not deterministic"
    difference = np.abs(pixels(published["fp8"][0]) - pixels(published["full"][0]))
    assert 0 < difference.mean() <= 2.0


def test_doctor_says_which_profile_is_in_force_and_why(tiny_model):
    from processor.report import doctor, doctor_text
    report = doctor(Settings(model_path=tiny_model, memory_profile="auto", device="cpu"))
    assert report["memory profile"]["profile"] == "full"
    assert "memory profile: full: not a CUDA device" in doctor_text(report)
    report = doctor(Settings(model_path=tiny_model, memory_profile="fp8-offload", device="cpu"))
    assert "fp8-offload: set by memory_profile" in doctor_text(report)


@needs_torchao
def test_torchao_stores_the_diffusion_models_linear_weights_as_int8(tiny_model):
    transformer = engine_for(tiny_model, "torchao")._transformer(params())
    weight = transformer.transformer_blocks[0].attn.to_q.weight
    inner = [getattr(weight, name) for name in weight.__tensor_flatten__()[0]]
    assert torch.int8 in {tensor.dtype for tensor in inner}, type(weight)


# The GPU benchmark --------------------------------------------------------------------------------

def test_the_gpu_benchmark_runs_at_tiny_size_on_the_cpu(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--size", "tiny", "--device", "cpu", "--models",
         str(tmp_path / "models"), "--profiles", "full,fp8-offload", "--megapixels", "0.004", "--jobs", "1",
         "--threads", "1", "--json", str(out)],
        cwd=ROOT / "bench", capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    figures = {row["profile"]: row for row in json.loads(out.read_text())}
    assert set(figures) == {"full", "fp8-offload"}
    for row in figures.values():
        assert set(row["stages"]) == {"prepare", "encode_latent", "encode_text", "sample", "decode"}
        assert len(row["step_seconds"]) == 4
        assert row["direct_seconds_per_job"] > 0 and row["daemon_seconds_per_job"] > 0
        assert set(row["load"]) == {"vae", "text_encoder", "transformer"}
    assert sum(figures["fp8-offload"]["held_bytes"].values()) < sum(figures["full"]["held_bytes"].values())
    assert "fp8-offload" in result.stdout and "daemon/direct" in result.stdout
