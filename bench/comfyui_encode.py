#!/usr/bin/env python3
"""How long the comfyui engine's encode_text takes with and without the negative prompt's
encoding, on ComfyUI's own nodes with tiny random-weight models (tests/comfyui_tiny.py).

    QIE_COMFYUI_PATH=/path/to/ComfyUI python bench/comfyui_encode.py [--size 64] [--rounds 5]

At cfg 1 ComfyUI's sampler never reads the negative conditioning, so the engine encodes only the
positive prompt; at any other cfg it encodes both, as it did at every cfg before. The two rows
are therefore "cfg 1 now" and "cfg 1 before" (the same work as cfg 2.5 now). Each
TextEncodeQwenImageEditPlus call rescales the reference image to about 1 MP and VAE-encodes it,
which dominates with tiny models. Models are loaded by a warm-up call first; the median of
``--rounds`` timed calls is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import comfyui_tiny  # noqa: E402

comfyui_tiny.install()  # before ComfyUI is imported

import torch  # noqa: E402

from config import Settings, StageParameters  # noqa: E402
from stages.comfyui_engine import ComfyUIEngine  # noqa: E402
from stages.model_cache import ModelCache  # noqa: E402

NAMES = comfyui_tiny.FILE_NAMES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image1 is SIZE x SIZE")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    comfyui = os.environ.get("QIE_COMFYUI_PATH")
    if not comfyui:
        raise SystemExit("set QIE_COMFYUI_PATH to a ComfyUI checkout")
    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder)
        settings = Settings(engine="comfyui", comfyui_path=Path(comfyui), device="cpu", threads=args.threads,
                            vae_name=NAMES["vae"], text_encoder_name=NAMES["text_encoder"],
                            diffusion_model_name=NAMES["diffusion_model"])
        engine = ComfyUIEngine(settings, ModelCache())
        comfyui_tiny.build_models(models)
        yaml = models / "extra_model_paths.yaml"
        yaml.write_text("bench:\n  base_path: .\n  vae: vae/\n  text_encoders: text_encoders/\n")
        engine.comfy.add_extra_model_paths(yaml)
        image = torch.randint(0, 256, (args.size, args.size, 3), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(0))
        prepared = {"images": [image]}
        print(f"{engine.version()}; {engine.device_name()}; image1 {args.size}x{args.size}; "
              f"median of {args.rounds}")
        for label, cfg in (("cfg 1 (negative skipped)", 1.0), ("cfg 2.5 (both encoded, as cfg 1 was before)", 2.5)):
            params = StageParameters(cfg=cfg, lora=None)
            engine.encode_text(prepared, params, "make the sky purple", "")  # warm-up: loads the models
            times = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                engine.encode_text(prepared, params, "make the sky purple", "")
                times.append(time.perf_counter() - started)
            print(f"  encode_text, {label}: {statistics.median(times):.2f} s "
                  f"(min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
