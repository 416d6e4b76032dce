#!/usr/bin/env python3
"""Real-size Qwen-Image-Edit-2509 models on a GPU, per memory profile: load seconds, seconds per
sampling step, a whole job through the daemon against a direct engine loop, peak device memory
per stage.

    python bench/gpu.py [--size real|tiny] [--device cuda|cpu] [--models DIR]
                        [--profiles full,fp8,fp8-offload-text,fp8-offload,offload,torchao]
                        [--megapixels 1.0] [--steps 4] [--jobs 2] [--gguf FILE] [--drop-caches]
                        [--json FILE]

Nothing is downloaded. The models are built from the published configurations with random
weights, directly on ``--device``, and saved once as safetensors under ``--models`` (a local
disk: about 58 GB at real size), then every profile loads them from there:

- the diffusion model: diffusers' default ``QwenImageTransformer2DModel`` (60 layers, 24 heads of
  128, joint attention dim 3584: 20.4 B parameters, 40.9 GB in bfloat16);
- the text encoder: Qwen2.5-VL-7B's configuration (28 layers of 3584, vocabulary 152064, the
  32-block vision tower: 8.3 B parameters, 16.6 GB), with a tokenizer trained here on built-in
  text (its token ids are what the configuration is given);
- the VAE: diffusers' default ``AutoencoderKLQwenImage``; the scheduler: Qwen-Image's.

Per profile, in this process: each model's load (seconds and peak device memory), then one job
run directly stage by stage (the warm-up; peak device memory per stage and seconds per sampling
step), then ``--jobs`` jobs through a direct engine loop and the same number through the daemon
(ingest, checkpoints, publishing) on the same loaded models. The job is a job file's default
(1 MP, 4 steps, cfg 1, Lightning's schedule) without a LoRA: a fused LoRA adds no time per step.

``--size tiny --device cpu`` runs the same code on the tiny model's sizes in seconds (a test does,
so that this script cannot rot); its figures say nothing about a GPU. On CUDA, device memory is
``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``: what the allocator holds); on
the CPU it is the resident memory above the level before the stage. ``--drop-caches`` empties
the page cache before each profile's loads (root), so that loads come from the disk.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from batch import colour, drain, drop_jobs, settings_for
from memory import Peak

from config import StageParameters
from processor.encode import image_bytes
from processor.daemon import Daemon
from stages.prepare import prepare
from stages.tiny_model import (ENGINE_HINTS, QWEN_IMAGE_SCHEDULER, SPECIAL_TOKENS, TEXT_HIDDEN, VISION_PATCH,
                               _train_tokenizer, _video_processor)
from tests.daemon import make_image

PROMPT = "make the sky purple"
DEFAULT_PROFILES = ("full", "fp8", "fp8-offload-text", "fp8-offload", "offload", "torchao")
MiB = 1024 ** 2

# The published configurations (diffusers' defaults for the transformer and VAE, Qwen2.5-VL-7B-
# Instruct's config.json and preprocessor_config.json), and the tiny model's sizes.
SIZES: dict[str, dict[str, Any]] = {
    "real": {
        "transformer": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                            axes_dims_rope=(16, 56, 56)),
        "text": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                     rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                         "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                       fullatt_block_indexes=[7, 15, 23, 31]),
        "processor": dict(patch_size=14, merge_size=2, temporal_patch_size=2,
                          size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}),
        "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True]),
        "hints": None,  # the engine's defaults: 1 MP for the VAE, 384x384 for the vision tower
    },
    "tiny": {
        "transformer": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                            num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, guidance_embeds=False,
                            axes_dims_rope=(8, 12, 12)),
        "text": dict(vocab_size=None, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=VISION_PATCH,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=VISION_PATCH * 4,
                       out_hidden_size=TEXT_HIDDEN, fullatt_block_indexes=[1]),
        "processor": dict(patch_size=VISION_PATCH, merge_size=2, temporal_patch_size=2,
                          size={"shortest_edge": (VISION_PATCH * 2) ** 2, "longest_edge": 64 * 64}),
        "vae": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                    temperal_downsample=[False, True, True]),
        "hints": ENGINE_HINTS,
    },
}


# Building ----------------------------------------------------------------------------------------

def build_models(folder: Path, size: str, device: str, seed: int = 0) -> Path:
    """The models of ``size`` with random weights, made on ``device`` and saved under ``folder``
    (once: an existing build is reused). Written into a sibling and renamed into place."""
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    spec = SIZES[size]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        tokenizer = _train_tokenizer()
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
        text = dict(spec["text"], vocab_size=spec["text"]["vocab_size"] or len(tokenizer),
                    bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                    pad_token_id=ids["<|endoftext|>"])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=spec["vision"],
                                  image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                  vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"])
        _save_random(lambda: Qwen2_5_VLForConditionalGeneration(config), tmp / "text_encoder", device, seed + 1)
        tokenizer.save_pretrained(tmp / "tokenizer")
        processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**spec["processor"]), tokenizer=tokenizer,
                                     video_processor=_video_processor())
        processor.save_pretrained(tmp / "processor")
        _save_random(lambda: QwenImageTransformer2DModel(**spec["transformer"]), tmp / "transformer", device, seed + 2)
        _save_random(lambda: AutoencoderKLQwenImage(**spec["vae"]), tmp / "vae", device, seed + 3)
        FlowMatchEulerDiscreteScheduler.from_config(
            {k: v for k, v in QWEN_IMAGE_SCHEDULER.items() if not k.startswith("_")}).save_pretrained(tmp / "scheduler")
        index = {"_class_name": "QwenImageEditPlusPipeline", "processor": ["transformers", "Qwen2VLProcessor"],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                 "tokenizer": ["transformers", "Qwen2Tokenizer"],
                 "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                 "vae": ["diffusers", "AutoencoderKLQwenImage"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if spec["hints"] is not None:
            (tmp / "qie_engine.json").write_text(json.dumps(spec["hints"], indent=2) + "\n")
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _save_random(make: Callable[[], Any], folder: Path, device: str, seed: int) -> None:
    """Make a model on ``device`` in bfloat16 (no host copy of its weights), give it seeded random
    weights (N(0, 1/fan_in) matrices, norm scales near 1, small biases), save it as safetensors."""
    import torch
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = make()
    finally:
        torch.set_default_dtype(default)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if not param.dtype.is_floating_point:
                continue
            if param.ndim >= 2:
                param.normal_(0.0, 1 / math.sqrt(math.prod(param.shape[1:])), generator=generator)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.normal_(1.0, 0.1, generator=generator)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Measuring ---------------------------------------------------------------------------------------

class Meter:
    """Seconds and peak memory of a block: the device's peak allocated/reserved bytes on CUDA,
    resident memory above the start on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self) -> "Meter":
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._peak = Peak().__enter__()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.started
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
            self.reserved = torch.cuda.max_memory_reserved()
        else:
            self._peak.__exit__(*exc)
            self.peak = self._peak.delta
            self.reserved = None


def drop_page_cache() -> bool:
    """Empty the page cache so that the next loads read the disk (root only)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def one_job(engine, settings, params: StageParameters, image: Path, seed: int, out: Path,
            meter: Optional[Callable[[], Meter]] = None) -> dict[str, Any]:
    """A job as a script would run it: prepare, the four operations, a PNG written. With
    ``meter``: each stage's seconds and peak memory, and each sampling step's seconds."""
    import torch
    cuda = meter is not None and meter().cuda
    stages: dict[str, dict[str, Any]] = {}
    step_times: list[float] = []
    last = [0.0]

    def on_step(k: int, state: Any) -> None:
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    state: dict[str, Any] = {}

    def run(name: str, call: Callable[[], Any]) -> None:
        if meter is None:
            state[name] = call()
            return
        with meter() as m:
            if name == "sample":
                last[0] = time.perf_counter()
            state[name] = call()
        stages[name] = {"seconds": round(m.seconds, 4), "peak_bytes": m.peak, "reserved_bytes": m.reserved}

    run("prepare", lambda: prepare([("image1", image)], params, settings.max_image_pixels))
    run("encode_latent", lambda: engine.encode_latent(state["prepare"], params))
    run("encode_text", lambda: engine.encode_text(state["prepare"], params, PROMPT, ""))
    run("sample", lambda: engine.sample(state["prepare"], state["encode_latent"], state["encode_text"], params,
                                        seed, None, on_step if meter is not None else None))
    run("decode", lambda: engine.decode(state["sample"], params))
    out.write_bytes(image_bytes(state["decode"]["image"], "png", 95, {}))
    return {"stages": stages, "step_seconds": [round(s, 4) for s in step_times]}


def measure_profile(profile: str, models: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    cuda = args.device.startswith("cuda")
    side = int(round(math.sqrt(args.megapixels) * 1024))
    job = {"megapixels": args.megapixels, "steps": args.steps, "lora": None}
    settings = settings_for(root, models, memory_profile=profile, device=args.device, threads=args.threads,
                            gguf_file=args.gguf if profile == "gguf" else None)
    params = StageParameters(**job)
    job["lora"] = "none"  # a job file's way of saying no LoRA
    root.mkdir(parents=True, exist_ok=True)
    if args.drop_caches and not drop_page_cache():
        print("note: could not drop the page cache (not root?): loads may come from memory", flush=True)
    daemon = Daemon(settings, once=True)
    daemon.start()
    try:
        engine = daemon.engine()
        choice = engine.profile_choice()
        loads = {}
        for role, load in (("vae", engine._vae), ("text_encoder", engine._text_encoder),
                           ("transformer", engine._transformer)):
            with Meter(cuda) as m:
                load(params)
            loads[role] = {"seconds": round(m.seconds, 3), "peak_bytes": m.peak}
        held = daemon.cache.sizes()
        images = {i: make_image(root / "direct-in" / f"{i}.png", (side, side), colour(i))
                  for i in [10_000, *range(args.jobs)]}
        (root / "direct").mkdir(parents=True, exist_ok=True)
        warm = one_job(engine, settings, params, images[10_000], 10_000, root / "direct" / "warm.png",
                       meter=lambda: Meter(cuda))
        with Meter(cuda) as direct:
            for i in range(args.jobs):
                one_job(engine, settings, params, images[i], i, root / "direct" / f"{i}.png")
        drop_jobs(settings.inbox, args.jobs, 0, side, **job)
        daemon.intake.wake.set()
        with Meter(cuda) as through:
            drain(daemon)
        published = len(list(settings.outbox.glob("job-*.png")))
        if published != args.jobs:
            raise RuntimeError(f"{profile}: the daemon published {published} of {args.jobs} jobs")
    finally:
        daemon.shutdown()
        daemon.cache.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    steps = warm["step_seconds"]
    return {
        "profile": profile, "reason": choice.reason, "device": engine.device_name(),
        "load": loads, "held_bytes": held, "stages": warm["stages"],
        "peak_bytes": max(stage["peak_bytes"] for stage in warm["stages"].values()),
        "step_seconds": steps, "sample_seconds": round(sum(steps), 4),
        "direct_seconds_per_job": round(direct.seconds / args.jobs, 4),
        "daemon_seconds_per_job": round(through.seconds / args.jobs, 4),
    }


# Output ------------------------------------------------------------------------------------------

def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    cuda = args.device.startswith("cuda")
    memory = "device peak allocated MiB" if cuda else "RSS above start MiB"
    print(f"\n{args.size} models on {results[0]['device'] if results else args.device}, "
          f"{args.megapixels} MP, {args.steps} steps, {args.jobs} jobs per side\n")
    print(f"{'profile':<18}{'load s (vae/text/dit)':>24}{'s/step':>9}{'sample s':>10}"
          f"{'direct s/job':>14}{'daemon s/job':>14}{'daemon/direct':>15}")
    for r in results:
        load = "/".join(f"{r['load'][role]['seconds']:.1f}" for role in ("vae", "text_encoder", "transformer"))
        per_step = r["sample_seconds"] / max(len(r["step_seconds"]), 1)
        ratio = r["direct_seconds_per_job"] / r["daemon_seconds_per_job"] if r["daemon_seconds_per_job"] else 0
        print(f"{r['profile']:<18}{load:>24}{per_step:>9.3f}{r['sample_seconds']:>10.3f}"
              f"{r['direct_seconds_per_job']:>14.3f}{r['daemon_seconds_per_job']:>14.3f}{ratio:>15.1%}")
    print(f"\n{memory} per stage (models loaded as the profile holds them)\n")
    names = ("encode_latent", "encode_text", "sample", "decode")
    print(f"{'profile':<18}" + "".join(f"{name:>15}" for name in names) + f"{'job peak':>12}{'held by cache':>15}")
    for r in results:
        cells = "".join(f"{r['stages'][name]['peak_bytes'] / MiB:>15.0f}" for name in names)
        print(f"{r['profile']:<18}{cells}{r['peak_bytes'] / MiB:>12.0f}{sum(r['held_bytes'].values()) / MiB:>15.0f}")
    if cuda:
        print("\npeak reserved by the allocator, MiB: " + ", ".join(
            f"{r['profile']} {max(s['reserved_bytes'] for s in r['stages'].values()) / MiB:.0f}" for r in results))
    print("\nwhy each profile holds what it does: " + "; ".join(f"{r['profile']}: {r['reason']}" for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="real")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--models", type=Path, help="where the built models are kept (default: the temp folder)")
    parser.add_argument("--profiles", default=",".join(DEFAULT_PROFILES), help="comma-separated memory profiles")
    parser.add_argument("--megapixels", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2, help="jobs per side (direct loop, daemon)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the daemon's default)")
    parser.add_argument("--gguf", type=Path, help="a GGUF file of the diffusion model (profile gguf)")
    parser.add_argument("--drop-caches", action="store_true", help="load from the disk, not the page cache (root)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    profiles = [p for p in args.profiles.split(",") if p]
    if "gguf" in profiles and args.gguf is None:
        parser.error("profile gguf needs --gguf FILE")
    if args.size == "real" and not args.device.startswith("cuda"):
        parser.error("real-size models are built on a GPU (--device cuda); use --size tiny on the CPU")
    models = args.models or Path(tempfile.gettempdir()) / "qie-bench-models" / args.size
    started = time.perf_counter()
    build_models(models, args.size, args.device)
    print(f"models ready in {time.perf_counter() - started:.1f}s at {models}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="qie-bench-gpu-") as tmp:
        for profile in profiles:
            results.append(measure_profile(profile, models, Path(tmp) / profile, args))
            print(f"{profile}: done", flush=True)
    print_tables(results, args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
